"""Tests for ponder: the model's exactness and causality, training, data preparation and sampling. CPU, no network.

Run with `python -m pytest -q` from the repository root.
"""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from ponder import KVCache, PonderConfig, PonderLM


def tiny(n_thoughts=1, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_thoughts=n_thoughts)
    model = PonderLM(PonderConfig(**{**cfg, **kw})).to(dtype)
    return model.eval()


def tokens(B=2, T=8, vocab=32, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def exact_without_cache(model, idx):
    """The exact recurrence, token by token with no cache: the independent reference below."""
    return ref_ponderlm2(model, idx)[0]


def cached_decoding(model, idx):
    cache = KVCache(idx.size(1) * (model.config.n_thoughts + 1))
    return torch.stack([model.step(idx[:, t], cache)[0] for t in range(idx.size(1))], dim=1)


# ---- the model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("J", [0, 1, 3])
def test_causality(K, J):
    model = tiny(K)
    idx = tokens()
    for t in [0, 3, 6]:
        other = idx.clone()
        other[:, t + 1:] = (other[:, t + 1:] + 1 + torch.arange(7 - t)) % 32
        a, _ = model(idx, jacobi=J)
        b, _ = model(other, jacobi=J)
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6     # and later positions do see the change


@pytest.mark.parametrize("K", [1, 2])
def test_jacobi_converges_to_cached_decoding(K):
    model = tiny(K)
    idx = tokens()
    T = idx.size(1)
    exact = cached_decoding(model, idx)
    full, _ = model(idx, jacobi=(T - 1) * K)
    torch.testing.assert_close(full, exact, rtol=0, atol=1e-10)
    fixed, _ = model(idx, jacobi="exact")
    torch.testing.assert_close(fixed, exact, rtol=0, atol=1e-10)
    gaps = [(model(idx, jacobi=J)[0] - exact).abs().max().item() for J in (1, 3, 5)]
    assert gaps[1] > 1e-6, "J = 3 should not already be exact on 8 tokens"
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_exact_thoughts_stop_early_in_float32(monkeypatch):
    model = tiny(1, dtype=torch.float32, block_size=64, seed=3)
    idx = tokens(T=64)
    passes = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda x, *a: passes.append(1) or run(x, *a))
    logits, _ = model(idx, jacobi="exact")
    assert len(passes) < 64 / 2, f"{len(passes)} passes: the rounding-level stop did not trigger"
    torch.testing.assert_close(logits, cached_decoding(model, idx), rtol=0, atol=1e-4)


@pytest.mark.parametrize("K", [0, 1, 2])
def test_cache_equals_recomputation(K):
    model = tiny(K)
    idx = tokens()
    torch.testing.assert_close(cached_decoding(model, idx), exact_without_cache(model, idx), rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2])
def test_prefill_then_step_is_exact(K):
    model = tiny(K)
    idx = tokens()
    exact = exact_without_cache(model, idx)
    cache = KVCache(8 * (K + 1))
    logits, thoughts = model.prefill(idx[:, :5], cache, exact=True)
    assert thoughts.shape == (2, K, 16)
    torch.testing.assert_close(logits, exact[:, 4], rtol=0, atol=1e-10)
    for t in range(5, 8):
        logits, _ = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, exact[:, t], rtol=0, atol=1e-10)


# ---- independent references: written from the method's pseudocode over the model's weights, sharing no code with
# ponder.py or baselines.py (explicit softmax attention, rotary embeddings by complex multiplication) -------------

def ref_norm(model, x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + model.config.norm_eps) * w


def ref_layers(model, x, pos):
    """The pre-norm Llama blocks over slot inputs x (B, S, d) at rotary positions pos (S ints), causal over the S
    slots in order. Returns the residual stream (no final norm)."""
    c = model.config
    d, nh = c.n_embd, c.n_head
    hs, S = d // nh, x.size(1)
    freqs = c.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.tensor(pos, dtype=torch.float64)[:, None] * freqs
    turn = torch.polar(torch.ones(S, hs // 2, dtype=torch.float64), angles)
    turn = torch.complex(turn.real.float().double(), turn.imag.float().double())   # the model keeps float32 tables

    def rope(t):                            # t: (B, S, nh, hs); rotate (t[i], t[i + hs/2]) as one complex number
        z = torch.complex(t[..., :hs // 2], t[..., hs // 2:]) * turn[:, None]
        return torch.cat([z.real, z.imag], dim=-1)

    mask = torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)
    for blk in model.blocks:
        a = ref_norm(model, x, blk.norm1.weight)
        q, k, v = (a @ blk.attn.qkv.weight.T).split(d, dim=-1)
        q, k, v = rope(q.view(*q.shape[:2], nh, hs)), rope(k.view(*k.shape[:2], nh, hs)), v.view(*v.shape[:2], nh, hs)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs) + mask
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(x.shape)
        x = x + y @ blk.attn.proj.weight.T
        m = ref_norm(model, x, blk.norm2.weight)
        x = x + (F.silu(m @ blk.mlp.gate.weight.T) * (m @ blk.mlp.up.weight.T)) @ blk.mlp.down.weight.T
    return x


def ref_run(model, x, pos):
    return ref_norm(model, ref_layers(model, x, pos), model.norm_f.weight)


def plain_transformer(model, idx):
    """A vanilla Llama forward: plain embeddings, one pass, the head."""
    return ref_run(model, model.wte.weight[idx], list(range(idx.size(1)))) @ model.lm_head.weight.T


def ref_ponderlm2(model, idx, thoughts=None):
    """PonderLM-2 as METHOD.md states it, token by token with no cache and no Jacobi iteration: token t's slot holds
    its embedding times sqrt(2.5 d), each thought slot holds the final-norm output of the slot before it, all K+1
    slots at position t, and the last slot's output is scored. Returns the logits (B, T, V) and the thoughts
    (B, T, K, d). Given `thoughts`, uses them as the thought inputs instead (one pass, no recurrence)."""
    K, d = model.config.n_thoughts, model.config.n_embd
    e = model.wte.weight[idx] * (math.sqrt(2.5 * d) if K else 1.0)
    slots, pos, logits, made = [], [], [], []
    for t in range(idx.size(1)):
        slots.append(e[:, t])
        pos.append(t)
        for k in range(K):
            z = thoughts[:, t, k] if thoughts is not None else ref_run(model, torch.stack(slots, 1), pos)[:, -1]
            made.append(z)
            slots.append(z)
            pos.append(t)
        if thoughts is None:
            logits.append(ref_run(model, torch.stack(slots, 1), pos)[:, -1] @ model.lm_head.weight.T)
    if thoughts is not None:
        logits = list((ref_run(model, torch.stack(slots, 1), pos)[:, K::K + 1] @ model.lm_head.weight.T).unbind(1))
    return torch.stack(logits, 1), torch.stack(made, 1).view(idx.size(0), idx.size(1), K, d) if K else None


def ref_pause(model, idx):
    """Token t's slots: W[x_t] sqrt(d), then K times p sqrt(d), all at position t; one causal pass; the last pause
    slot of each token is scored."""
    K, d = model.config.n_thoughts, model.config.n_embd
    s = math.sqrt(d)
    slots, pos = [], []
    for t in range(idx.size(1)):
        slots += [model.wte.weight[idx[:, t]] * s] + [model.pause[0].expand(idx.size(0), d) * s] * K
        pos += [t] * (K + 1)
    return ref_run(model, torch.stack(slots, 1), pos)[:, K::K + 1] @ model.lm_head.weight.T


def ref_loop(model, idx):
    """r = W[x] sqrt(2.5 d); K+1 times r = blocks(r); logits = head(final_norm(r))."""
    r = model.wte.weight[idx] * math.sqrt(2.5 * model.config.n_embd)
    for _ in range(model.config.n_thoughts + 1):
        r = ref_layers(model, r, list(range(idx.size(1))))
    return ref_norm(model, r, model.norm_f.weight) @ model.lm_head.weight.T


def ref_ponderlm(model, idx):
    """E = W[x] sqrt(d); X = E; K times: h = run(X), q = softmax(head(h)), X = E + q (sqrt(d) W); head(run(X))."""
    W, head, pos = model.wte.weight, model.lm_head.weight, list(range(idx.size(1)))
    E = W[idx] * math.sqrt(model.config.n_embd)
    X = E
    for _ in range(model.config.n_thoughts):
        X = E + (ref_run(model, X, pos) @ head.T).softmax(-1) @ (math.sqrt(model.config.n_embd) * W)
    return ref_run(model, X, pos) @ head.T


def test_no_thoughts_is_a_plain_transformer():
    model = tiny(0)
    idx = tokens()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, plain_transformer(model, idx), rtol=0, atol=1e-10)
    assert model.emb_scale == 1.0
    sizes = {tiny(K).num_params() for K in (0, 1, 2, 3)}
    assert len(sizes) == 1, sizes


def test_no_thoughts_costs_one_pass(monkeypatch):
    model = tiny(0)
    calls = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    model(tokens(), jacobi=3)
    assert len(calls) == 1
    model1 = tiny(1)
    run1 = model1.run
    monkeypatch.setattr(model1, "run", lambda *a, **kw: calls.append(1) or run1(*a, **kw))
    calls.clear()
    model1(tokens(), jacobi=3)
    assert len(calls) == 1 + 3 + 1                     # K init passes, J Jacobi passes, the final pass


def test_loss_at_init_and_gradients():
    torch.manual_seed(0)
    model = PonderLM(PonderConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64, n_thoughts=1))
    idx = torch.randint(256, (4, 33))
    model.train()
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.4, loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"


def test_scaled_embedding_has_unit_rms():
    model = PonderLM(PonderConfig(vocab_size=256, n_embd=256, n_thoughts=1))
    rms = model.embed(torch.arange(256)).pow(2).mean().sqrt().item()
    assert 0.9 < rms < 1.1, rms


@pytest.mark.parametrize("K", [0, 1])
def test_overfits_one_batch(K):
    torch.manual_seed(0)
    model = PonderLM(PonderConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, n_thoughts=K))
    idx = torch.randint(32, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_clear_errors():
    model = tiny(1)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens(T=9))
    with pytest.raises(ValueError, match="targets have shape"):
        model(tokens(), tokens()[:, :-1])
    with pytest.raises(ValueError, match="jacobi"):
        model(tokens(), jacobi=-1)
    for bad in [dict(n_thoughts=-1), dict(jacobi_min=-1), dict(jacobi_eval=-2), dict(jacobi_min=3, jacobi_max=2),
                dict(n_embd=30, n_head=4)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            PonderConfig(**bad)


def test_flops():
    L, K1 = tiny(0, n_layer=4), tiny(1, n_layer=2)
    N = sum(p.numel() for p in K1.blocks.parameters() if p.dim() == 2)
    # K = 1 with L layers does the same matmul work per decoded token as K = 0 with 2L layers
    attn = lambda m, slots: 4 * m.config.n_layer * 16 * slots * 8 * (slots)  # noqa: E731
    assert L.flops_per_token(training=False) - attn(L, 1) == K1.flops_per_token(training=False) - attn(K1, 2)
    # a K = 1 training step costs about (3 + 2J)x the vanilla one of the same depth
    V0 = tiny(0, n_layer=2)
    assert V0.flops_per_token() == 3 * (2 * N + 4 * 2 * 16 * 8 + 2 * 16 * 32)
    ratio = K1.flops_per_token(jacobi=2) / V0.flops_per_token()
    assert 5 < ratio < 3 + 2 * 2 + 4, ratio


def test_generate_runs_past_block_size():
    model = tiny(1, dtype=torch.float32)
    out = list(model.generate(tokens(B=1, T=3), max_new_tokens=20, temperature=0))
    assert len(out) == 20
    assert all(tok.shape == (1,) and th.shape == (1, 1, 16) for tok, th in out)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("K", [1, 2])
def test_jacobi_forward_and_gradients_equal_the_independent_reference(K):
    """The thing that matters most, against a reference that shares no code with ponder.py: with (T-1)K Jacobi
    passes the training forward is the exact recurrence, and so are its gradients (a detached thought, a wrong slot
    or position, or a missing embedding scale all show here)."""
    model = tiny(K).train()
    idx, targets = tokens(), tokens(seed=2)
    ref_logits, _ = ref_ponderlm2(model, idx)
    ref_grads = grads(model, F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()))
    logits, loss = model(idx, targets, jacobi=(idx.size(1) - 1) * K)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    for name, g in grads(model, loss).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("K", [1, 2])
def test_cached_decoding_equals_the_independent_reference(K):
    model = tiny(K)
    idx = tokens()
    torch.testing.assert_close(cached_decoding(model, idx), ref_ponderlm2(model, idx)[0], rtol=0, atol=1e-10)


# ---- cheaper training: gradients through the last passes only --------------------------------------------------

def test_grad_passes_all_changes_nothing():
    model = tiny(1).train()
    idx, targets = tokens(), tokens(seed=2)
    base = grads(model, model(idx, targets, jacobi=3)[1])
    model.config.grad_passes = 1 + 3 + 1                # K + J + final: every pass
    for name, g in grads(model, model(idx, targets, jacobi=3)[1]).items():
        assert torch.equal(g, base[name]), name


@pytest.mark.parametrize("K", [1, 2])
def test_grad_passes_1_is_the_final_pass_on_constant_exact_thoughts(K):
    model = tiny(K, grad_passes=1).train()
    idx, targets = tokens(), tokens(seed=2)
    _, thoughts = ref_ponderlm2(model, idx)
    ref_logits, _ = ref_ponderlm2(model, idx, thoughts=thoughts.detach())     # one pass, thoughts as constants
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
    ref_grads = grads(model, ref_loss)
    logits, loss = model(idx, targets, jacobi=(idx.size(1) - 1) * K)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)            # the loss is the exact loss
    for name, g in grads(model, loss).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("n", [1, 2, 3, 0])
def test_grad_passes_is_the_number_of_passes_with_gradients(monkeypatch, n):
    model = tiny(1, grad_passes=n).train()
    modes = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda x, *a: modes.append(torch.is_grad_enabled()) or run(x, *a))
    model(tokens(), tokens(), jacobi=3)
    assert len(modes) == 1 + 3 + 1
    assert modes == [False] * (5 - n) + [True] * n if n else modes == [True] * 5, modes


def test_grad_passes_2_differs_from_1_and_all():
    model = tiny(1).train()
    idx, targets = tokens(), tokens(seed=2)
    g = {}
    for n in (0, 1, 2):
        model.config.grad_passes = n
        g[n] = grads(model, model(idx, targets, jacobi=3)[1])["wte.weight"]
    assert not torch.allclose(g[2], g[1]) and not torch.allclose(g[2], g[0])


def test_grad_passes_flops_by_hand():
    """K = 1, J = 3: passes of 1, 2, 2, 2 slots per token, then the final 2-slot pass with the head."""
    model = tiny(1, n_layer=2)
    c = model.config
    N = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    one = 2 * N + 4 * 2 * 16 * 1 * 8                   # a 1-slot pass: matmuls + attention over 1*T keys
    two = 2 * (2 * N + 4 * 2 * 16 * 2 * 8)              # a 2-slot pass: twice the slots, each over 2*T keys
    head = 2 * 16 * 32
    expect = {0: 3 * (one + 3 * two + two + head),      # all five passes forward and backward
              1: one + 3 * two + 3 * (two + head),      # only the final pass gets a backward
              2: one + 2 * two + 3 * (two + two + head),
              9: 3 * (one + 3 * two + two + head)}      # more than there are: all
    for n, flops in expect.items():
        c.grad_passes = n
        assert model.flops_per_token(jacobi=3) == flops, n
    c.grad_passes = 1
    assert model.flops_per_token() == (model.flops_per_token(jacobi=2) + model.flops_per_token(jacobi=3)) / 2


# ---- the baselines: Pause, Loop, PonderLM --------------------------------------------------------------------

from baselines import build  # noqa: E402

BASELINES = {"pause": ref_pause, "loop": ref_loop, "ponderlm": ref_ponderlm}


def tiny_method(method, K, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_thoughts=K)
    return build(method, PonderConfig(**{**cfg, **kw})).double().eval()


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_matches_its_reference(method, K):
    model = tiny_method(method, K)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], BASELINES[method](model, idx), rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_cached_decoding_equals_the_forward(method, K):
    model = tiny_method(method, K)
    idx = tokens()
    full, _ = model(idx)
    cache = model.new_cache()
    logits, thoughts = model.prefill(idx[:, :3], cache)
    assert thoughts.shape == (2, K, 16)
    torch.testing.assert_close(logits, full[:, 2], rtol=0, atol=1e-10)
    for t in range(3, 8):
        logits, _ = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="past block_size"):
        model.step(idx[:, 0], cache)


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_causality(method):
    model = tiny_method(method, 2)
    idx = tokens()
    for t in [0, 3, 6]:
        other = idx.clone()
        other[:, t + 1:] = (other[:, t + 1:] + 1 + torch.arange(7 - t)) % 32
        a, b = model(idx)[0], model(other)[0]
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_with_no_extra_steps_is_vanilla(method):
    vanilla, model = tiny_method("ponderlm2", 0), tiny_method(method, 0)
    idx = tokens()
    assert model.num_params() == vanilla.num_params()
    assert torch.equal(model(idx)[0], vanilla(idx)[0])
    added = tiny_method(method, 3).num_params() - vanilla.num_params()
    assert added == (16 if method == "pause" else 0), added      # Pause adds one vector, the others nothing


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_gradients_reach_every_parameter(method):
    model = tiny_method(method, 2).train()
    _, loss = model(tokens(), tokens(seed=2))
    for name, g in grads(model, loss).items():
        assert g.abs().sum() > 0, f"{name} received no gradient"


def test_baseline_flops_by_hand():
    """BASELINES.md's cost table, forward FLOPs per token; training is 3x."""
    K, L, d, T, V = 3, 2, 16, 8, 32
    N = sum(p.numel() for p in tiny_method("loop", K).blocks.parameters() if p.dim() == 2)
    forward = {"pause": (K + 1) * 2 * N + 4 * L * d * (K + 1) ** 2 * T + 2 * d * V,
               "loop": (K + 1) * (2 * N + 4 * L * d * T) + 2 * d * V,
               "ponderlm": (K + 1) * (2 * N + 4 * L * d * T) + (2 * K + 1) * 2 * d * V}
    for method, f in forward.items():
        model = tiny_method(method, K)
        assert model.flops_per_token(training=False) == f, method
        assert model.flops_per_token() == 3 * f, method


REFS = {"ponderlm2": lambda m, idx: ref_ponderlm2(m, idx)[0], "pause": ref_pause, "loop": ref_loop,
        "ponderlm": ref_ponderlm}


@pytest.mark.parametrize("method", REFS)
def test_generate_refills_the_context_exactly(method):
    """Past block_size, generate keeps the last half of the context and goes on: every greedy token must be the
    argmax of the independent reference over exactly that window (computed here, from the rule alone)."""
    model = tiny_method(method, 1)
    T, seq = model.config.block_size, tokens(B=1, T=3)[0].tolist()
    out = [t.item() for t, _ in model.generate(torch.tensor([seq]), max_new_tokens=14, temperature=0)]
    start = 0
    for i, t in enumerate(out):
        expected = REFS[method](model, torch.tensor([seq[start:]]))[0, -1].argmax().item()
        assert t == expected, f"token {i} (window {start}..{len(seq)})"
        seq.append(t)
        if len(seq) - start > T:                   # the window is full: keep its last T/2 tokens
            start = len(seq) - T // 2
    assert start > 0, "the test never reached the refill"


@pytest.mark.parametrize("method", ["ponderlm2", "pause", "loop", "ponderlm"])
def test_decoding_keeps_cudnn_attention_out(method, monkeypatch):
    """cuDNN's attention builds a kernel plan per new key length (measured: sample.py at 12 tokens/s on an H200),
    so attention over a KV cache must run with it switched off; whole sequences (S == L) may use it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.size(2) == k.size(2), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cfg = PonderConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, n_thoughts=1)
    model = build(method, cfg).eval()
    list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert {cudnn for whole, cudnn, _ in seen if not whole} == {False}
    assert torch.backends.cuda.cudnn_sdp_enabled()             # and it is back on afterwards
    seen.clear()
    with sdpa_kernel(SDPBackend.MATH):                         # a caller's own choice of kernels is kept
        list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert seen and not any(flash for _, _, flash in seen)


def test_generate_at_block_size_1():
    model = tiny(1, block_size=1)
    out = list(model.generate(tokens(B=1, T=3), max_new_tokens=5, temperature=0))
    assert len(out) == 5


def test_evaluation_uses_jacobi_eval_passes(monkeypatch):
    model = tiny(1, jacobi_eval=4).train()
    passes = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda x, *a: passes.append(1) or run(x, *a))
    model.eval()
    model(tokens())
    assert len(passes) == 1 + 4 + 1                  # K growing passes, jacobi_eval refinements, the final pass
    passes.clear()
    model.train()
    model(tokens())
    assert len(passes) in (1 + 2 + 1, 1 + 3 + 1)      # in training J is drawn from [jacobi_min, jacobi_max]


def test_emb_scale_option():
    d = 16
    assert tiny(1).emb_scale == math.sqrt(2.5 * d) and tiny(0).emb_scale == 1.0
    assert tiny(0, emb_scale="sqrt_2.5d").emb_scale == math.sqrt(2.5 * d)
    assert tiny(1, emb_scale="1").emb_scale == 1.0
    assert tiny_method("pause", 3).emb_scale == math.sqrt(d) and tiny_method("pause", 0).emb_scale == 1.0
    assert tiny_method("loop", 3).emb_scale == math.sqrt(2.5 * d)
    assert tiny_method("ponderlm", 3, emb_scale="sqrt_2.5d").emb_scale == math.sqrt(2.5 * d)
    with pytest.raises(ValueError, match="emb_scale"):
        PonderConfig(emb_scale="2")


# ---- data and training ----------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402
import pretrained  # noqa: E402
import train  # noqa: E402
from data.prepare import ByteTokenizer, claim, prepare_documents, prepare_text  # noqa: E402

REPO = Path(__file__).resolve().parent
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # é ✓\n\n" for i in range(200))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--micro_batch=4", "--batch_tokens=128",
        "--eval_windows=8", "--log_interval=1", "--warmup_iters=2", "--device=cpu", "--lr=3e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small byte-level dataset of 30 documents (so that val gets whole documents)."""
    out, _ = claim(tmp_path_factory.mktemp("data") / "tiny", force=False)
    prepare_documents(out, [TEXT[i * 300:(i + 1) * 300 + 700].encode() for i in range(30)], ByteTokenizer(), "test")
    return str(out)


def train_run(dataset, out, *args):
    return train.main([f"--dataset={dataset}", f"--out_dir={out}", *TINY, *args])


def log_losses(out):
    entries = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def weights(out):
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)["model"]


def test_prepare_text_file(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prepare_text(src, out=tmp_path / "notes")
    n = len(TEXT.encode("utf-8"))
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(0.9 * n), n - int(0.9 * n))
    assert json.loads((tmp_path / "notes" / "meta.json").read_text())["vocab_size"] == 256
    ids = np.concatenate([np.fromfile(tmp_path / "notes" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert ByteTokenizer().decode(ids.tolist()) == TEXT


def test_download_resumes_and_fails_clearly_offline(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    import data.prepare as prep
    body = bytes(range(256)) * 100
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "f.txt").write_bytes(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "f.txt"
        Path(f"{dest}.part").write_bytes(body[:1000])        # an interrupted download
        prep.download(f"http://127.0.0.1:{server.server_port}/f.txt", dest)
        assert dest.read_bytes() == body and not Path(f"{dest}.part").exists()
    finally:
        server.shutdown()
    with pytest.raises(RuntimeError, match="cannot reach 127.0.0.1:9.*needs the network"):
        prep.download("http://127.0.0.1:9/nothing.txt", tmp_path / "g.txt")    # nothing listens on port 9


def test_resume_equals_uninterrupted(dataset, tmp_path):
    train_run(dataset, tmp_path / "a", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3")
    train_run(dataset, tmp_path / "b", "--max_iters=3", "--lr_decay_iters=6", "--eval_interval=3")
    train_run(dataset, tmp_path / "b", "--max_iters=6")          # --init_from=auto finds the checkpoint
    a, b = log_losses(tmp_path / "a"), log_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    for k, w in weights(tmp_path / "a").items():
        torch.testing.assert_close(w, weights(tmp_path / "b")[k], rtol=1e-5, atol=1e-6)


class SGD(torch.optim.SGD):
    """Plain SGD standing in for AdamW in the tests: a step is w - lr * g, so a gradient off by any factor shows
    (AdamW and clipping would hide it)."""

    def __init__(self, groups, lr, **_):
        super().__init__(groups, lr=lr)


SGD_ARGS = ["--grad_clip=0", "--weight_decay=0", "--warmup_iters=0", "--max_iters=2", "--eval_interval=2", "--lr=0.5"]


def reference_sgd(dataset, out, ranks, accum):
    """The run in `out` recomputed without train.py's loop: per step, ONE forward over the sequences of every rank
    and micro-step together, the mean loss, w -= lr * grad. Uses the model's forward (not under test here)."""
    ckpt = torch.load(Path(out) / "ckpt.pt", weights_only=True)
    cfg = train.TrainConfig(**ckpt["train_config"])
    torch.manual_seed(cfg.seed)
    model = build(cfg.method, PonderConfig(**ckpt["model_config"])).train()
    meta = {**json.loads((Path(dataset) / "meta.json").read_text()), "folder": Path(dataset), "align": 1,
            "targets": False}
    for step in range(ckpt["step"]):
        offsets = np.concatenate([train.train_offsets(meta, cfg, step, m) for m in range(ranks * accum)])
        x, y = train.get_batch(meta, "train", offsets, cfg.block_size, "cpu")
        loss = model(x, y, jacobi=train.jacobi_for(cfg, step))[1]
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= train.lr_at(cfg, step) * p.grad
    return model.state_dict()


def assert_same_weights(a, b, atol=2e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def test_accumulated_step_equals_one_big_step(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", SGD)
    train_run(dataset, tmp_path, *SGD_ARGS, "--batch_tokens=128", "--micro_batch=4")    # 2 micro-steps of 4
    assert_same_weights(weights(tmp_path), reference_sgd(dataset, tmp_path, ranks=1, accum=2))


def test_two_accumulating_ranks_equal_one_big_step(dataset, tmp_path):
    """2 gloo ranks x 2 micro-steps, with gradients through the last 2 passes only: the no-grad passes must not
    disturb DDP, gradients must be synchronised on the last micro-step and averaged. Evaluation must not depend
    on the number of ranks or the micro-batch."""
    runner = tmp_path / "run_sgd.py"
    runner.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch\nimport train\nimport test_ponder\n"
                      "torch.optim.AdamW = test_ponder.SGD\ntrain.main(sys.argv[1:])\n")
    args = [f"--dataset={dataset}", *TINY, *SGD_ARGS, "--batch_tokens=256", "--micro_batch=4", "--grad_passes=2",
            f"--out_dir={tmp_path / 'two'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(runner), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 seqs x 16 x 2 ranks x 2 accumulation" in result.stdout
    assert_same_weights(weights(tmp_path / "two"), reference_sgd(dataset, tmp_path / "two", ranks=2, accum=2))
    cfg = train.TrainConfig(**{**torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["train_config"],
                               "micro_batch": 3})
    torch.manual_seed(cfg.seed)
    model = build("ponderlm2", PonderConfig(vocab_size=256, **{k: getattr(cfg, k) for k in common.MODEL_KEYS}))
    meta = {**json.loads((Path(dataset) / "meta.json").read_text()), "folder": Path(dataset), "align": 1,
            "targets": False}
    val0 = train.evaluate(model, meta, cfg, "cpu", train.nullcontext(), 0, 1)      # 1 rank, micro-batch 3
    logged = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert logged[0] == {"step": 0, "val_loss": pytest.approx(val0, abs=1e-6)}


def test_train_py_evaluates_with_jacobi_eval_passes(dataset, monkeypatch):
    cfg = train.TrainConfig(block_size=16, micro_batch=4, eval_windows=8, jacobi_eval=4)
    model = tiny(1, dtype=torch.float32, vocab_size=256, block_size=16, jacobi_eval=4).train()
    passes = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda x, *a: passes.append(1) or run(x, *a))
    meta = {**json.loads((Path(dataset) / "meta.json").read_text()), "folder": Path(dataset), "align": 1,
            "targets": False}
    train.evaluate(model, meta, cfg, "cpu", train.nullcontext(), 0, 1)
    assert len(passes) == 2 * (1 + 4 + 1) and model.training      # 2 batches of 4 windows; back in train mode


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    lr = [train.lr_at(cfg, s) for s in range(130)]
    assert lr[0] == pytest.approx(0.1) and lr[4] == pytest.approx(0.5) and lr[9] == lr[10] == 1.0   # warmup
    assert lr[60] == pytest.approx(0.55)                             # half way down the cosine: (1 + 0.1) / 2
    assert all(a > b for a, b in zip(lr[10:110], lr[11:111]))         # decreasing all the way
    assert lr[110:] == [pytest.approx(0.1)] * 20                      # then the floor
    cfg.lr_decay_iters, cfg.max_iters = 110, 200                      # a run extended past its schedule
    assert train.lr_at(cfg, 150) == pytest.approx(0.1) and train.lr_at(cfg, 60) == pytest.approx(0.55)


def test_extending_a_finished_run_keeps_its_schedule(dataset, tmp_path):
    train_run(dataset, tmp_path, "--max_iters=4", "--eval_interval=4")
    train_run(dataset, tmp_path, "--max_iters=6", "--eval_interval=2")
    lrs = {e["step"]: e["lr"] for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in e}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[5] == lrs[6] == pytest.approx(3e-3 * 0.1)             # the floor, not a restarted cosine
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]["lr_decay_iters"] == 4


def test_resume_applies_the_options_given_now(dataset, tmp_path):
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    train_run(dataset, tmp_path, "--max_iters=3", "--weight_decay=0.05", "--beta2=0.99")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    decayed, rest = ckpt["optimizer"]["param_groups"]
    assert decayed["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert tuple(decayed["betas"]) == tuple(rest["betas"]) == (0.9, 0.99)
    assert ckpt["train_config"]["weight_decay"] == 0.05 and ckpt["train_config"]["beta2"] == 0.99


def test_batch_layout_fits_any_number_of_ranks():
    gpu = train.TrainConfig(**{f.name: f.metadata["gpu"] for f in dataclasses.fields(train.TrainConfig)
                               if f.metadata["gpu"] is not None})                     # the CUDA defaults
    assert (gpu.batch_tokens, gpu.micro_batch, gpu.block_size) == (32768, 64, 256)
    for world in range(1, 9):
        micro, accum, tokens = common.batch_layout(gpu, set(), world)
        assert micro * accum * 256 * world == tokens and micro <= 64, world
        assert abs(tokens / 32768 - 1) < 0.05, (world, tokens)
    assert common.batch_layout(gpu, set(), 1) == (64, 2, 32768) and common.batch_layout(gpu, set(), 8) == (16, 1, 32768)
    assert common.batch_layout(train.TrainConfig(), set(), 1) == (8, 1, 1024)          # the CPU defaults
    assert common.batch_layout(gpu, {"batch_tokens"}, 4) == (32, 1, 32768)             # given: kept exactly
    with pytest.raises(train.Fail, match="not a multiple"):
        common.batch_layout(gpu, {"batch_tokens", "micro_batch"}, 3)


def test_bf16_only_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert common.pick_device("cuda", "auto")[2] == "float32"         # emulated only (pre-Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert common.pick_device("cuda", "auto")[2] == "bfloat16"


def test_peak_flops_table(monkeypatch):
    for name, peak in [("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA A10G", None), ("NVIDIA A10", 125e12), ("NVIDIA H200", 989e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert common.peak_flops("cuda", "bfloat16") == peak, name


# ---- nothing lost, nothing mixed ------------------------------------------------------------------------------

def test_a_second_run_in_the_same_folder_is_refused(dataset, tmp_path):
    holder = common.RunDir(tmp_path)
    holder.claim()
    with pytest.raises(train.Fail, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        train_run(dataset, tmp_path, "--max_iters=1")
    holder.release()
    train_run(dataset, tmp_path, "--max_iters=1")
    # a run killed by kill -9 leaves no stale lock behind
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, common; r = common.RunDir(sys.argv[1]); r.claim(); "
                          "print('held', flush=True); time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "held\n"
    p.kill()
    p.wait()
    train_run(dataset, tmp_path, "--max_iters=2")


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_concurrent_saves_never_collide(tmp_path):
    import threading
    errors = []

    def save(value):
        try:
            for _ in range(10):
                common.save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.full((1000,), value)})
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=save, args=(v,)) for v in (1.0, 2.0)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"].unique().numel() == 1


def wait_for(p, text):
    """Read p's stdout until a line containing text; return the lines read."""
    lines = []
    while text not in (line := p.stdout.readline()):
        assert line, "".join(lines) + p.stderr.read()
        lines.append(line)
    return lines


def test_sigterm_stops_after_the_step_and_saves(dataset, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={tmp_path}", *TINY,
                          "--max_iters=100000", "--eval_interval=100000"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(p, "step 3/")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == "", err
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == step


def children(pid):
    """The process ids whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-one-rank", "sigterm-to-the-whole-job"])
def test_a_signal_under_torchrun_stops_every_rank_at_one_step(dataset, tmp_path, how):
    """Ctrl-C in a terminal reaches torchrun's process group; torchrun passes it on to each worker. A scheduler may
    signal a single worker: the other must stop at the same step. Or it signals every process of the job: each
    worker then gets SIGTERM twice (directly, then through torchrun), which is one request, not two. The final
    evaluation is made long, so that the second copy arrives while there is still work to do."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", f"--dataset={dataset}", f"--out_dir={tmp_path}", *TINY, "--max_iters=100000",
                          "--eval_interval=100000", "--eval_windows=4000"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(p, "step 3/")
    workers = children(p.pid)
    assert len(workers) == 2, workers
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    elif how == "sigterm-to-one-rank":
        os.kill(workers[-1], signal.SIGTERM)
    else:
        for pid in [*workers, p.pid]:
            os.kill(pid, signal.SIGTERM)
    out, err = p.communicate(timeout=180)
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step
    assert 'train.py", line' not in err and "interrupted" not in err, err[-2000:]   # torchrun may print its own


def test_disk_full_at_a_save_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")

    def full(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    with pytest.raises(train.Fail, match="No space left on device.*ckpt.pt still holds step 2"):
        train_run(dataset, tmp_path, "--max_iters=4", "--eval_interval=2")
    assert "saved" not in capsys.readouterr().out
    monkeypatch.undo()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "lock", "log.jsonl"]


def test_out_of_gpu_memory_names_the_micro_batch(dataset, tmp_path, monkeypatch):
    """A CUDA out-of-memory error (simulated: CPU has none) is one line that says what to lower; nothing is lost."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "get_batch", oom)
    with pytest.raises(train.Fail, match="out of GPU memory at --micro_batch=4: use a smaller one.*ckpt.pt is kept"):
        train_run(dataset, tmp_path, "--max_iters=4", "--eval_interval=2")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    with pytest.raises(train.Fail, match="or a smaller model$"):                 # no checkpoint yet: none named
        train_run(dataset, tmp_path / "new", "--max_iters=4", "--eval_interval=2")


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_a_real_write_failure_at_a_save_keeps_the_last_checkpoint(dataset, tmp_path, fraction):
    """The disk fills up for real (a file-size limit makes writes fail as a full disk does): one line, and the
    previous checkpoint and the log survive. Where the write fails decides what torch.save raises (a RuntimeError
    inside it, an OSError at the flush), hence two limits."""
    import resource
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    size = int((tmp_path / "ckpt.pt").stat().st_size * fraction)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))    # noqa: E731
    result = subprocess.run([sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={tmp_path}", *TINY,
                             "--max_iters=4", "--eval_interval=2"], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "ckpt.pt still holds step 2" in result.stderr and "saved" not in result.stdout.split("step 0")[-1]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "lock", "log.jsonl"]


def test_a_failed_log_rewrite_keeps_the_log(dataset, tmp_path, monkeypatch):
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0}\n')            # a step the checkpoint does not have: rewind drops it
    before = (tmp_path / "log.jsonl").read_bytes()

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "replace", full)
    with pytest.raises(train.Fail, match="cannot write .*log.jsonl: No space left on device"):
        train_run(dataset, tmp_path, "--max_iters=3")
    assert (tmp_path / "log.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "lock", "log.jsonl"]


def test_a_folder_without_locks_warns_and_a_failed_start_leaves_nothing(dataset, tmp_path, monkeypatch, capsys):
    def no_locks(f):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(common, "lock_file", no_locks)
    train_run(dataset, tmp_path / "nfs", "--max_iters=1")
    assert "warning: cannot lock" in capsys.readouterr().out and (tmp_path / "nfs" / "ckpt.pt").exists()
    monkeypatch.undo()
    with pytest.raises(train.Fail, match="not found"):
        train_run(str(tmp_path / "no_data"), tmp_path / "new", "--max_iters=1")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv", [["--beta1=2"], ["--beta2=nan"], ["--beta2=1"], ["--seed=-1"], ["--seed=18446744073709551616"], ["--grad_clip=nan"],
                                  ["--lr=inf"], ["--weight_decay=nan"], ["--rope_theta=0"], ["--norm_eps=-1"], ["--min_lr_ratio=2"],
                                  ["--method=pondr"], ["--emb_scale=2"], ["--method=loop", "--jacobi_min=1"],
                                  ["--learning_rate=1e-3"], ["--init_from=maybe"]])
def test_bad_options_fail_in_one_line_before_any_work(dataset, tmp_path, capsys, argv):
    out = tmp_path / "never_made"
    try:
        train_run(dataset, out, *argv)
    except SystemExit:                                  # argparse: usage line, then one error line
        err = capsys.readouterr().err
        assert err.count("\n") == 2 and "error:" in err, err
        if "learning_rate" in argv[0]:
            assert "did you mean --lr?" in err
    except train.Fail as e:
        assert "\n" not in str(e) and argv[-1].split("=")[0].lstrip("-") in str(e), str(e)
    else:
        pytest.fail(f"{argv} was accepted")
    assert not out.exists()


def test_divergence_names_only_a_checkpoint_that_exists(dataset, tmp_path, monkeypatch):
    forward = PonderLM.forward
    monkeypatch.setattr(PonderLM, "forward", lambda self, *a, **kw: (lambda lg, ls: (lg, ls * float("nan")))(
        *forward(self, *a, **kw)))
    with pytest.raises(train.Fail, match="diverged; no checkpoint was saved"):
        train_run(dataset, tmp_path, "--max_iters=2")


def test_an_out_dir_that_cannot_be_used(dataset, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(train.Fail, match="cannot use --out_dir=.*a_file"):
        train_run(dataset, tmp_path / "a_file", "--max_iters=1")

    def read_only(self, *a, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(train.Fail, match="Read-only file system; choose a writable folder"):
        train_run(dataset, tmp_path / "ro", "--max_iters=1")


def test_a_damaged_log_is_repaired_on_resume(dataset, tmp_path):
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1, 2]\n"text"\n{"step": "x"}\n{"no_step": 1}\n{"step": 9, "loss": 1}\n{"ste')
    train_run(dataset, tmp_path, "--max_iters=3")
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3]


def test_starting_over_keeps_the_previous_run(dataset, tmp_path):
    train_run(dataset, tmp_path, "--max_iters=1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    train_run(dataset, tmp_path, "--max_iters=1", "--init_from=scratch", "--seed=5")
    (old,) = tmp_path.glob("previous-*")
    assert (old / "ckpt.pt").read_bytes() == before and (old / "log.jsonl").exists()


def test_compiled_bf16_training_matches_eager(dataset, tmp_path, monkeypatch):
    """train.py's CUDA path on the CPU: every block compiled (aot_eager: the graphs, without code generation) under
    bf16 autocast, against eager bf16. Also counts the graphs: they must not depend on J."""
    from torch._dynamo.utils import counters
    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile(self, **kw, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    args = ["--dtype=bfloat16", "--max_iters=4", "--eval_interval=4", "--jacobi_min=1", "--jacobi_max=3"]
    train_run(dataset, tmp_path / "c", *args, "--compile=true")
    graphs = counters["stats"]["unique_graphs"]
    train_run(dataset, tmp_path / "e", *args, "--compile=false")
    c, e = log_losses(tmp_path / "c"), log_losses(tmp_path / "e")
    assert sorted(c) == [1, 2, 3, 4]
    for step in c:
        assert c[step] == pytest.approx(e[step], abs=2e-2), step
    assert graphs <= 2 * 2, f"{graphs} graphs: one per slot count (1, 2) and grad mode at most"


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        common.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_diverging_run_stops_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    forward = PonderLM.forward

    def nan_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, loss * float("nan")

    monkeypatch.setattr(PonderLM, "forward", nan_forward)
    with pytest.raises(train.Fail, match="diverged"):
        train_run(dataset, tmp_path, "--max_iters=4")
    ckpt = weights(tmp_path)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert all(torch.isfinite(w).all() for w in ckpt.values())


def test_clear_errors_from_train(dataset, tmp_path, capsys):
    with pytest.raises(train.Fail, match="not found"):
        train_run(str(tmp_path / "nothing"), tmp_path / "o1")
    with pytest.raises(train.Fail, match="fewer than block_size"):
        train_run(dataset, tmp_path / "o2", "--block_size=4096")
    with pytest.raises(train.Fail, match="not a multiple"):
        train_run(dataset, tmp_path / "o2", "--batch_tokens=100")
    with pytest.raises(train.Fail, match="no checkpoint"):
        train_run(dataset, tmp_path / "o2", "--init_from=resume")
    # a checkpoint of another shape, and one of another vocabulary
    train_run(dataset, tmp_path / "o3", "--max_iters=1")
    with pytest.raises(train.Fail, match="n_layer=2, not 3"):
        train_run(dataset, tmp_path / "o3", "--n_layer=3", "--max_iters=2")
    gpt2 = tmp_path / "gpt2data"
    gpt2.mkdir()
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(gpt2 / f"{split}.bin")
    (gpt2 / "meta.json").write_text(json.dumps(dict(tokenizer="gpt2", vocab_size=50257, train_tokens=1000,
                                                    val_tokens=1000)))
    with pytest.raises(train.Fail, match="vocabulary of 256"):
        train_run(str(gpt2), tmp_path / "o3", "--max_iters=2")
    # a checkpoint whose tensors do not fit its own config, and a corrupt file
    ckpt = torch.load(tmp_path / "o3" / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "o3" / "ckpt.pt")
    with pytest.raises(train.Fail, match="do not fit a ponderlm2 model"):
        train_run(dataset, tmp_path / "o3", "--max_iters=2")
    (tmp_path / "o3" / "ckpt.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(train.Fail, match="not a readable checkpoint"):
        train_run(dataset, tmp_path / "o3", "--max_iters=2")
    # bad command lines name the option
    for argv, expected in [(["--n_layers=3"], "did you mean --n_layer"), (["--max_iters=ten"], "--max_iters"),
                           (["--compile=maybe"], None), (["--n_thoughts=-1"], None)]:
        try:
            train_run(dataset, tmp_path / "o4", *argv)
        except SystemExit:
            assert expected in capsys.readouterr().err
        except train.Fail as e:
            assert argv[0].split("=")[0].lstrip("-") in str(e)
        else:
            pytest.fail(f"{argv} was accepted")


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--dataset=missing_dataset", f"--out_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: dataset 'missing_dataset'")


# ---- sampling -------------------------------------------------------------------------------------------------

import sample  # noqa: E402


@pytest.fixture(scope="module", params=[1, 2], ids=["K1", "K2"])
def trained(request, dataset, tmp_path_factory):
    """A checkpoint from a short train.py run."""
    out = tmp_path_factory.mktemp(f"run_k{request.param}")
    train.main([f"--dataset={dataset}", f"--out_dir={out}", *TINY, f"--n_thoughts={request.param}", "--max_iters=5",
                "--eval_interval=5"])
    return out


def test_sampling_is_reproducible(trained, capsys):
    args = [f"--out_dir={trained}", "--max_new_tokens=20", "--num_samples=2", "--start=def f"]
    first = sample.main([*args, "--seed=7"])
    assert len(first) == 2 and all(len(s) == 20 for s in first)
    assert sample.main([*args, "--seed=7"]) == first
    assert sample.main([*args, "--seed=8"]) != first
    assert "tokens/s" in capsys.readouterr().err


def test_greedy_sampling_follows_the_exact_logits(trained):
    prompt = "def "                                     # 4 + 12 tokens fit in block_size 16
    out = sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=1", "--max_new_tokens=12",
                       f"--start={prompt}"])[0]
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    model = PonderLM(PonderConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = list(prompt.encode())
    for t in out:
        logits = model(torch.tensor([ids]), jacobi="exact")[0][0, -1]
        assert logits[t] >= logits.max() - 1e-4, "greedy decoding picked a token that is not the argmax"
        ids.append(t)


def test_show_thoughts_prints_k_per_token(trained, capsys):
    K = torch.load(trained / "ckpt.pt", weights_only=True)["model_config"]["n_thoughts"]
    sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=2", "--max_new_tokens=15",
                 "--show_thoughts", "--thought_tokens=2"])
    captured = capsys.readouterr()
    assert captured.out.count("⟦") == captured.out.count("⟧") == K * 15 * 2
    assert "\033[" not in captured.out                   # no colour codes when the output is not a terminal
    assert "legend" in captured.err


def test_sample_errors_and_odd_prompts(trained, tmp_path, capsys):
    with pytest.raises(train.Fail, match="train one with `python train.py`"):
        sample.main([f"--out_dir={tmp_path}"])
    with pytest.raises(train.Fail, match="temperature"):
        sample.main([f"--out_dir={trained}", "--temperature=-1"])
    with pytest.raises(train.Fail, match="top_k"):
        sample.main([f"--out_dir={trained}", "--top_k=0"])
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xff\xfe broken utf-8 " + b"x = 1\n" * 10)      # longer than block_size 16
    out = sample.main([f"--out_dir={trained}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=40"])
    assert len(out[0]) == 40
    assert "keeping its last 16" in capsys.readouterr().err
    broken = b"x = \xff\xfe".decode("utf-8", errors="surrogateescape")      # how argv delivers invalid bytes
    assert len(sample.main([f"--out_dir={trained}", f"--start={broken}", "--num_samples=1", "--max_new_tokens=5"])[0]) == 5


def test_sample_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main([f"--out_dir={trained}", "--temperature=nan"])
    assert "expected a finite number" in capsys.readouterr().err
    with pytest.raises(train.Fail, match="more than the vocabulary"):
        sample.main([f"--out_dir={trained}", "--show_thoughts", "--thought_tokens=1000"])
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    (tmp_path / "a").mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, tmp_path / "a" / "ckpt.pt")
    with pytest.raises(train.Fail, match="not a checkpoint of train.py .*'model_config'"):
        sample.main([f"--out_dir={tmp_path / 'a'}"])
    ckpt["model"]["wte.weight"] = ckpt["model"]["wte.weight"][:10]
    torch.save(ckpt, tmp_path / "a" / "ckpt.pt")
    with pytest.raises(train.Fail, match="does not match the model it describes"):
        sample.main([f"--out_dir={tmp_path / 'a'}"])


def default_sigint():
    """A shell starts background jobs with SIGINT ignored, and Python then never turns it into KeyboardInterrupt:
    give the child the terminal's default, whatever the test runner got."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sample_into_a_closed_pipe_and_ctrl_c(trained):
    cmd = f"{sys.executable} sample.py --out_dir={trained} --num_samples=50 --max_new_tokens=200 | head -c 20"
    result = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, timeout=120)
    assert len(result.stdout) == 20 and b"Error" not in result.stderr and b"Traceback" not in result.stderr
    p = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={trained}", "--num_samples=1000"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    while "sample 2/" not in p.stderr.readline():
        pass
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "interrupted", err


@pytest.mark.parametrize("method", ["pause", "loop", "ponderlm"])
def test_every_method_trains_and_samples(dataset, tmp_path, method, capsys):
    train_run(dataset, tmp_path, f"--method={method}", "--n_thoughts=2", "--max_iters=3", "--eval_interval=3")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["method"] == method
    out = sample.main([f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=30", "--show_thoughts",
                       "--temperature=0"])
    assert len(out[0]) == 30
    assert capsys.readouterr().out.count("⟦") == 2 * 30
    with pytest.raises(train.Fail, match=f"is a {method} model|has method={method}"):
        train_run(dataset, tmp_path, "--method=ponderlm2", "--max_iters=4")


def test_prepare_refuses_to_overwrite_or_escape_data(tmp_path, monkeypatch, capsys):
    import data.prepare as prep
    monkeypatch.setattr(prep, "DATA_DIR", tmp_path / "data")
    src = tmp_path / "stdlib.txt"
    src.write_text(TEXT, encoding="utf-8")
    prep.main(["text", str(src)])
    before = (tmp_path / "data" / "stdlib" / "train.bin").read_bytes()
    src.write_text("something else entirely\n" * 50, encoding="utf-8")
    for argv, message in [(["text", str(src)], "already holds a dataset; .* --force"),
                          (["text", str(src), "--name=../../x"], "plain folder name"),
                          (["text", str(src), "--name=a/b"], "plain folder name")]:
        with pytest.raises(SystemExit, match=message):
            prep.main(argv)
    assert (tmp_path / "data" / "stdlib" / "train.bin").read_bytes() == before
    prep.main(["text", str(src), "--force"])
    assert (tmp_path / "data" / "stdlib" / "train.bin").read_bytes() != before
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match="empty"):
        prep.main(["text", str(tmp_path / "empty.txt")])
    assert not (tmp_path / "data" / "empty").exists()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = "python -m pytest -q"
    assert f"\n{command}\n" in readme and ci.rstrip().endswith(command)


# ---- new runs from another run's weights, per-token targets --------------------------------------------------

def test_a_new_run_from_another_runs_weights(dataset, tmp_path, capsys):
    """--init_from=PATH: the weights arrive unchanged (the new run's step-0 evaluation equals the source's last),
    the optimizer state and the schedule do not (a new run), K may change and the run trains, the source's
    embedding scale is kept, the same command resumes, and what cannot fit fails in one line."""
    src = tmp_path / "src"
    train_run(dataset, src, "--n_thoughts=0", "--max_iters=3", "--eval_interval=3")
    src_val = json.loads((src / "log.jsonl").read_text().splitlines()[-1])["val_loss"]
    train_run(dataset, tmp_path / "same", f"--init_from={src}", "--max_iters=1")
    assert json.loads((tmp_path / "same" / "log.jsonl").read_text().splitlines()[0]) == {"step": 0, "val_loss": src_val}
    new = tmp_path / "k1"
    train_run(dataset, new, f"--init_from={src / 'ckpt.pt'}", "--n_thoughts=1", "--max_iters=2", "--eval_interval=2")
    ckpt = torch.load(new / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_config"]["n_thoughts"] == 1
    assert ckpt["model_config"]["emb_scale"] == "1"                  # the source was trained without a scale
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}    # AdamW counts from 0 again
    assert torch.load(src / "ckpt.pt", weights_only=True)["step"] == 3         # the source is untouched
    train_run(dataset, new, f"--init_from={src / 'ckpt.pt'}", "--n_thoughts=1", "--max_iters=3")
    assert torch.load(new / "ckpt.pt", weights_only=True)["step"] == 3          # the same command resumes
    with pytest.raises(train.Fail, match="did not start from"):
        train_run(dataset, new, f"--init_from={tmp_path / 'same'}", "--max_iters=4")
    with pytest.raises(train.Fail, match="cannot start from .*n_embd=32, not 64"):
        train_run(dataset, tmp_path / "wide", f"--init_from={src}", "--n_embd=64")
    with pytest.raises(train.Fail, match="no checkpoint there"):
        train_run(dataset, tmp_path / "none", f"--init_from={tmp_path / 'nothing'}")
    assert not (tmp_path / "wide").exists() and not (tmp_path / "none").exists()


def masked_dataset(folder, n_seqs=40, L=12, vocab=7, seed=0):
    """Sequences of L random tokens; the target at each position is the running sum mod vocab, scored only at odd
    positions (-1 elsewhere). meta.json says align=L and targets=true."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for split, n in [("train", n_seqs), ("val", n_seqs // 4)]:
        x = rng.integers(0, vocab, size=(n, L))
        y = np.cumsum(x, axis=1) % vocab
        y[:, ::2] = -1
        x.astype(np.uint16).tofile(folder / f"{split}.bin")
        y.astype(np.int32).tofile(folder / f"{split}_targets.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer="bytes", vocab_size=vocab, train_tokens=n_seqs * L,
                                                      val_tokens=n_seqs // 4 * L, align=L, targets=True)))
    return folder


def test_per_token_targets_and_aligned_windows(tmp_path):
    data = masked_dataset(tmp_path / "sums")
    meta = common.load_dataset(str(data), 12, True)
    cfg = train.TrainConfig(block_size=12, micro_batch=4, eval_windows=10)
    offsets = np.concatenate([train.train_offsets(meta, cfg, s, 0) for s in range(20)])
    assert (offsets % 12 == 0).all() and offsets.max() <= 40 * 12 - 12 and len(set(offsets)) > 10
    x, y = train.get_batch(meta, "train", offsets[:4], 12, "cpu")
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16).reshape(40, 12)
    for row, o in enumerate(offsets[:4]):
        assert x[row].tolist() == tokens[o // 12].tolist()
        assert y[row].tolist() == [(-1 if i % 2 == 0 else int(tokens[o // 12][:i + 1].sum() % 7)) for i in range(12)]
    # the evaluation scores only the positions with a target, over whole sequences from their start
    model = tiny(0, dtype=torch.float32, vocab_size=64, block_size=12)
    val = train.evaluate(model, meta, cfg, "cpu", train.nullcontext(), 0, 1)
    vx = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).reshape(10, 12).astype(np.int64))
    vy = torch.from_numpy(np.fromfile(data / "val_targets.bin", dtype=np.int32).reshape(10, 12).astype(np.int64))
    logits = model(vx)[0]
    expected = F.cross_entropy(logits[:, 1::2].flatten(0, 1), vy[:, 1::2].flatten())
    assert val == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(train.Fail, match="fewer than block_size"):
        common.load_dataset(str(data), 600, True)
    (data / "val_targets.bin").write_bytes(b"\0" * 8)
    with pytest.raises(train.Fail, match="val_targets.bin holds 8 bytes, not the 120 values"):
        common.load_dataset(str(data), 12, True)


# ---- misuse, round two --------------------------------------------------------------------------------------------

def test_sighup_stops_after_the_step_and_saves(dataset, tmp_path):
    """Closing the terminal (SIGHUP) is a stop request like SIGTERM: the step finishes, a checkpoint is saved."""
    p = subprocess.Popen([sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={tmp_path}", *TINY,
                          "--max_iters=100000", "--eval_interval=100000"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(p, "step 3/")
    p.send_signal(signal.SIGHUP)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == "", err
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step


def test_a_failed_fresh_start_moves_nothing(dataset, tmp_path):
    """--init_from=scratch with an option the dataset cannot serve fails before the old run is set aside, so the
    next plain command resumes it."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(train.Fail, match="fewer than block_size"):
        train_run(dataset, tmp_path, "--init_from=scratch", "--block_size=100000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "lock", "log.jsonl"]
    train_run(dataset, tmp_path, "--max_iters=3")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_stale_temporaries_of_dead_processes_are_removed(dataset, tmp_path):
    """kill -9 during a save leaves ckpt.pt.<pid>-<hex>.tmp; the next run in the folder removes those of dead
    processes (and never one of a live process)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ckpt.pt.{int(dead.stdout)}-0a1b2c3d.tmp"
    live = tmp_path / f"ckpt.pt.{os.getpid()}-0a1b2c3d.tmp"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    train_run(dataset, tmp_path, "--max_iters=1")
    assert not stale.exists() and live.exists()


def test_an_empty_out_dir_or_log_folder_is_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(train.Fail, match="--out_dir is empty"):
        train_run(dataset, "", "--max_iters=1")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run" / "log.jsonl").mkdir(parents=True)
    with pytest.raises(train.Fail, match="log.jsonl is not a file"):
        train_run(dataset, tmp_path / "run", "--max_iters=1")


@pytest.mark.parametrize("damage", ["odd train.bin", "id past the vocabulary", "no tokenizer", "vocab as text",
                                    "not an object"])
def test_a_damaged_dataset_is_one_line_before_any_work(dataset, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    meta = json.loads((bad / "meta.json").read_text())
    if damage == "odd train.bin":
        with open(bad / "train.bin", "ab") as f:
            f.write(b"\0")
    elif damage == "id past the vocabulary":
        ids = np.fromfile(bad / "val.bin", dtype=np.uint16)
        ids[7] = 300
        ids.tofile(bad / "val.bin")
    elif damage == "no tokenizer":
        del meta["tokenizer"]
    elif damage == "vocab as text":
        meta["vocab_size"] = "256"
    if damage in ("no tokenizer", "vocab as text"):
        (bad / "meta.json").write_text(json.dumps(meta))
    if damage == "not an object":
        (bad / "meta.json").write_text("[1, 2]")
    with pytest.raises(train.Fail) as e:
        train_run(str(bad), tmp_path / "out", "--max_iters=1")
    assert "\n" not in str(e.value) and ("prepare the dataset again" in str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_rank_without_torchrun_is_one_line(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(train.Fail, match="RANK is set, but not LOCAL_RANK.*torchrun"):
        train_run(dataset, tmp_path, "--max_iters=1")


def test_out_of_cpu_memory_is_one_line(dataset, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train, "get_batch", oom)
    with pytest.raises(train.Fail, match="^out of memory at --micro_batch=4: use a smaller one"):
        train_run(dataset, tmp_path, "--max_iters=1")


def test_training_goes_on_when_stdout_is_full(dataset, tmp_path):
    """train.py > /dev/full: a warning on stderr, and the run trains and saves; its log.jsonl has every line."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={tmp_path}", *TINY,
                                 "--max_iters=2", "--eval_interval=2"], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "standard output" in result.stderr, result.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_eval_windows_beyond_the_split(dataset, tmp_path, capsys):
    with pytest.raises(train.Fail, match="--eval_windows=2000000000 .* the val split holds"):
        train_run(dataset, tmp_path / "a", "--eval_windows=2e9", "--max_iters=1")
    train_run(dataset, tmp_path / "b", "--eval_windows=3000", "--max_iters=1")
    assert "note: the val split holds" in capsys.readouterr().out


def test_eval_only_on_weights_without_optimizer_state(dataset, tmp_path):
    train_run(dataset, tmp_path, "--max_iters=1")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    val = train_run(dataset, tmp_path, "--eval_only")
    assert math.isfinite(val["val_loss"])
    with pytest.raises(train.Fail, match="no optimizer state to continue from"):
        train_run(dataset, tmp_path, "--max_iters=2")


def test_dataset_names_resolve_from_anywhere(dataset, tmp_path, monkeypatch):
    """--dataset=tiny/ and --dataset=data/tiny from another directory both find data/tiny."""
    repo = tmp_path / "repo"
    shutil.copytree(dataset, repo / "data" / "tiny")
    monkeypatch.setattr(common, "REPO", repo)
    monkeypatch.setattr(common, "DATA_DIR", repo / "data")
    monkeypatch.chdir(tmp_path)
    for name in ["tiny/", "data/tiny", "tiny"]:
        assert common.load_dataset(name, 16, True)["folder"] == repo / "data" / "tiny", name


def test_sample_output_streams(trained, tmp_path):
    """sample.py > /dev/full and >&- are one line on stderr; with 2>&- the notes never land in the text."""
    args = [sys.executable, "sample.py", f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=5"]
    with open("/dev/full", "w") as full:
        r = subprocess.run(args, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: cannot write the text")
    assert "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and "standard output is closed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                       preexec_fn=lambda: os.close(2))
    assert r.returncode == 0 and "sample 1/1" not in r.stdout and "tokens/s" not in r.stdout, r.stdout


def test_sample_seeds_temperatures_and_prompt_files(trained, capsys):
    greedy = sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=1", "--max_new_tokens=8"])
    tiny_t = sample.main([f"--out_dir={trained}", "--temperature=1e-40", "--num_samples=1", "--max_new_tokens=8"])
    assert tiny_t == greedy                           # a vanishing temperature is greedy, not nan
    for seed in ["-5", "18446744073709551616"]:
        with pytest.raises(train.Fail, match="--seed must be within"):
            sample.main([f"--out_dir={trained}", f"--seed={seed}"])
    with pytest.raises(train.Fail, match="needs a file name after the colon"):
        sample.main([f"--out_dir={trained}", "--start=FILE:"])


def test_prepare_messages_and_empty_splits(tmp_path, monkeypatch):
    import data.prepare as prep
    monkeypatch.setattr(prep, "DATA_DIR", tmp_path / "data")
    (tmp_path / "data" / "stdlib").mkdir(parents=True)
    (tmp_path / "data" / "stdlib" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a dataset; pass --force to replace it$"):
        prep.prepare_stdlib.__defaults__ = (tmp_path / "data" / "stdlib", False)
        prep.main(["stdlib"])
    hidden = tmp_path / ".hidden.txt"
    hidden.write_text(TEXT)
    with pytest.raises(SystemExit, match="cannot name a dataset after '.hidden.txt': give --name=NAME"):
        prep.main(["text", str(hidden)])
    docs = tmp_path / "docs"                            # every 20th document (the val split) is empty
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text("" if i % 20 == 19 else TEXT[:200])
    with pytest.raises(SystemExit, match="empty val split"):
        prep.main(["text", str(docs)])
    assert not (tmp_path / "data" / "docs").exists()

    def offline():
        raise RuntimeError("the gpt2 tokenizer needs its vocabulary, which tiktoken downloads on first use")

    monkeypatch.setattr(prep, "GPT2Tokenizer", offline)
    with pytest.raises(SystemExit, match="downloads on first use"):
        prep.main(["text", str(hidden), "--name=g", "--tokenizer=gpt2"])
    with pytest.raises(SystemExit, match="downloads on first use"):
        prep.main(["tinystories"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["stdlib"]


def test_prepare_text_streams_a_big_file(tmp_path):
    """A 40 MB text file is prepared with far less memory than the old 29x the file's size."""
    big = tmp_path / "big.txt"
    big.write_bytes((TEXT.encode() * 2000)[:40_000_000])
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from data.prepare import prepare_text; "
            "prepare_text(sys.argv[2], out=sys.argv[3]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO), str(big), str(tmp_path / "big")], capture_output=True,
                       text=True, check=True)
    peak_mb = int(r.stdout.split()[-1]) / 1024
    assert peak_mb < 400, f"{peak_mb:.0f} MB"


# ---- GPT-NeoX and Hugging Face checkpoint folders in train.py and sample.py ----------------------------------------

def hf_dataset(folder, tokenizer, vocab, n=600, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        rng.integers(0, vocab, size=n).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer=tokenizer, vocab_size=vocab, train_tokens=n,
                                                      val_tokens=n)))
    return folder


def test_train_from_a_hugging_face_folder(tmp_path):
    """--init_from=DIR (a GPT-NeoX folder): the weights arrive as the folder defines them (the new run's step-0
    evaluation equals one made here from the loader's model), the neox settings come along (rotary_pct, scale 1,
    J up to 4), K may change, and a dataset made with another tokenizer is refused."""
    from tests_pending.test_neox import HF_CONFIG, hf_folder, hf_weights
    cfg = {**HF_CONFIG, "vocab_size": 64, "max_position_embeddings": 16}
    folder = hf_folder(tmp_path / "hf", hf_weights(cfg), cfg)
    (folder / "tokenizer.json").write_text("{}")        # only its name is needed to train
    data = hf_dataset(tmp_path / "data", str((folder / "tokenizer.json").resolve()), 64)
    args = [f"--dataset={data}", f"--init_from={folder}", "--block_size=16", "--micro_batch=4", "--batch_tokens=64",
            "--eval_windows=8", "--device=cpu", "--log_interval=1"]
    train.main([*args, "--out_dir", str(tmp_path / "k0"), "--n_thoughts=0", "--max_iters=1"])
    config, weights = pretrained.load_neox(folder)
    model = PonderLM(PonderConfig(**{**config, "block_size": 16}))
    model.load_state_dict(weights)
    meta = common.load_dataset(str(data), 16, True)
    expected = train.evaluate(model, meta, train.TrainConfig(block_size=16, micro_batch=4, eval_windows=8), "cpu",
                              train.nullcontext(), 0, 1)
    first = json.loads((tmp_path / "k0" / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(expected, abs=1e-6)
    train.main([*args, "--out_dir", str(tmp_path / "k1"), "--n_thoughts=1", "--max_iters=2"])
    ckpt = torch.load(tmp_path / "k1" / "ckpt.pt", weights_only=True)
    mc, tc = ckpt["model_config"], ckpt["train_config"]
    assert (mc["arch"], mc["rotary_pct"], mc["emb_scale"], mc["n_thoughts"], mc["jacobi_max"]) == ("neox", 0.25, "1", 1, 4)
    assert ckpt["step"] == 2 and tc["init_from"] == str(folder)
    other = hf_dataset(tmp_path / "bytes", "bytes", 64)
    with pytest.raises(train.Fail, match="has a vocabulary of 64 .* needs 64 \\(bytes\\)"):
        train.main([*args[1:], f"--dataset={other}", "--out_dir", str(tmp_path / "k2"), "--max_iters=1"])


def test_prepare_and_sample_with_a_checkpoint_tokenizer(tmp_path):
    """With the tokenizers package: prepare.py --tokenizer=DIR tokenizes text with the folder's tokenizer.json, and
    sample.py --init_from=DIR samples from the folder itself, decoding with that tokenizer."""
    tk = pytest.importorskip("tokenizers")
    from tests_pending.test_neox import HF_CONFIG, hf_folder, hf_weights
    cfg = {**HF_CONFIG, "vocab_size": 320, "max_position_embeddings": 32}
    folder = hf_folder(tmp_path / "hf", hf_weights(cfg), cfg)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator([TEXT], tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    src = tmp_path / "code.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prepare_text(src, out=tmp_path / "code", tokenizer=str(folder))
    assert meta["tokenizer"] == str((folder / "tokenizer.json").resolve()) and meta["vocab_size"] <= 300
    ids = np.fromfile(tmp_path / "code" / "train.bin", dtype=np.uint16)
    assert tok.decode(ids[:50].tolist()) == TEXT[:len(tok.decode(ids[:50].tolist()))]
    out = sample.main([f"--init_from={folder}", "--start=def f", "--num_samples=1", "--max_new_tokens=6",
                       "--temperature=0"])
    model = PonderLM(PonderConfig(**pretrained.load_neox(folder)[0]))
    model.load_state_dict(pretrained.load_neox(folder)[1])
    ids = tok.encode("def f").ids
    for t in out[0]:                                   # greedy: each token is the argmax of the folder's model
        assert t == model(torch.tensor([ids]))[0][0, -1].argmax().item()
        ids.append(t)
