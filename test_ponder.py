"""Tests for ponder, grouped by the claim each one checks, in the order of README.md's "What the tests check":

     1. the thought loop is the method            5. the baselines               9. data
     2. causality                                 6. cheaper training            10. sampling
     3. the cache and generation                  7. the training step           11. nothing lost
     4. K = 0 is a plain transformer              8. where a run starts          12. bad input gives one line
                                                                                    13. the state-tracking task

and, at the end, checks of the repository itself. Every test's docstring starts with the claim it checks. CPU only,
no network. Run with `python -m pytest -q` from the repository root.
"""

import dataclasses
import functools
import http.server
import inspect
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import data.groups as groups
import data.prepare as prep
import pretrained
import sample
import train
from baselines import build
from ponder import PonderConfig, PonderLM

sys.path.insert(0, str(Path(__file__).resolve().parent / "assets"))
import state_tracking  # noqa: E402   the study's driver (assets/ is not a package)

REPO = Path(__file__).resolve().parent

# One thread for torch, in this process and (through OMP_NUM_THREADS) in every process a test starts. The tests do
# their work one small piece at a time, often on cores that other work keeps busy, where a second thread mostly waits
# for a core. Measured on 2 cores at a load of 6.5 to 8, back to back: 4 min 5 s so, 17 min 12 s with torch's
# default of 2 threads.
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ================================================================================================================
# Helpers: tiny models, the independent references, datasets and runs
# ================================================================================================================

METHODS = ["ponderlm2", "pause", "loop", "ponderlm"]
BASELINES = METHODS[1:]


def tiny(K=1, method="ponderlm2", arch="llama", dtype=torch.float64, seed=0, **kw):
    """A tiny model in eval mode: a vocabulary of 32, 8 tokens, 2 blocks of width 16 with 2 heads; a neox model turns
    4 of each head's 8 dimensions. Its norm gains (and a neox model's biases) are drawn at random too: they start at
    1 and 0, where a dropped gain or bias would not show."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_thoughts=K, arch=arch,
               rotary_pct=0.5 if arch == "neox" else 1.0)
    model = build(method, PonderConfig(**{**cfg, **kw})).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tokens(B=2, T=8, vocab=32, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def cached_decoding(model, idx):
    """Logits (B, T, V) of decoding idx one token at a time with the model's KV cache, from an empty one."""
    cache = model.new_cache()
    return torch.stack([model.step(idx[:, t], cache)[0] for t in range(idx.size(1))], dim=1)


def record_passes(model, monkeypatch):
    """A list that gets one entry per pass the model runs from now on: whether gradients were on."""
    passes, run = [], model.run
    monkeypatch.setattr(model, "run", lambda *a, **kw: passes.append(torch.is_grad_enabled()) or run(*a, **kw))
    return passes


# ---- independent references ------------------------------------------------------------------------------------
# Written from docs/method.md and from the definitions of the two blocks, over a model's weights, and sharing no code
# with ponder.py or baselines.py: norms and GELU by hand, explicit softmax attention, rotary embeddings by complex
# multiplication, no cache, no Jacobi iteration (a recurrence is recomputed from scratch for every slot).

def ref_rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_rope(t, pos, r, theta):
    """Rotary embedding of t (B, S, nh, hs) at positions pos (S ints): the pair (t[i], t[i + r/2]), i < r/2, turned
    as one complex number by the angle pos * theta^(-2i/r); the dimensions from r on pass unchanged. The turns are
    rounded through float32, as the model keeps its tables (and Hugging Face computes its own)."""
    angles = torch.tensor(pos, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, r, 2).double() / r)
    turn = torch.complex(angles.cos().float().double(), angles.sin().float().double())[:, None]   # (S, 1, r/2)
    z = torch.complex(t[..., :r // 2], t[..., r // 2:r]) * turn
    return torch.cat([z.real, z.imag, t[..., r:]], dim=-1)


def ref_attention(q, k, v):
    """q, k, v: (B, S, nh, hs); softmax(q k^T / sqrt(hs) + causal mask) v, heads merged: (B, S, nh * hs)."""
    S, hs = q.size(1), q.size(-1)
    mask = torch.full((S, S), float("-inf"), dtype=q.dtype).triu(1)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs) + mask
    return torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).flatten(2)


def ref_blocks(model, x, pos):
    """Every block over slot inputs x (B, S, d) at rotary positions pos (S ints), causal over the S slots in order;
    returns the residual stream (no final norm). Llama: x + attn(rms(x)), then + swiglu(rms(x)), no biases, rotary
    on the whole head. GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)), both branches reading the same x, biases everywhere,
    an exact-GELU MLP, rotary on the first rotary_pct of each head."""
    c = model.config
    d, nh, eps = c.n_embd, c.n_head, c.norm_eps
    hs = d // nh
    r = int(hs * c.rotary_pct)

    def linear(x, layer):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    def attention(a, attn):
        q, k, v = (t.reshape(*t.shape[:2], nh, hs) for t in linear(a, attn.qkv).split(d, dim=-1))   # [q; k; v]
        y = ref_attention(ref_rope(q, pos, r, c.rope_theta), ref_rope(k, pos, r, c.rope_theta), v)
        return linear(y, attn.proj)

    for blk in model.blocks:
        if c.arch == "llama":
            x = x + attention(ref_rms_norm(x, blk.norm1.weight, eps), blk.attn)
            m = ref_rms_norm(x, blk.norm2.weight, eps)
            x = x + (F.silu(m @ blk.mlp.gate.weight.T) * (m @ blk.mlp.up.weight.T)) @ blk.mlp.down.weight.T
        else:
            a = ref_layer_norm(x, blk.norm1.weight, blk.norm1.bias, eps)
            m = ref_layer_norm(x, blk.norm2.weight, blk.norm2.bias, eps)
            x = x + attention(a, blk.attn) + linear(ref_gelu(linear(m, blk.mlp.up)), blk.mlp.down)
    return x


def ref_final_norm(model, x):
    f, eps = model.norm_f, model.config.norm_eps
    return ref_rms_norm(x, f.weight, eps) if model.config.arch == "llama" else ref_layer_norm(x, f.weight, f.bias, eps)


def ref_run(model, x, pos):
    """One pass: every block, then the final norm; its output at a slot is what the LM head reads there."""
    return ref_final_norm(model, ref_blocks(model, x, pos))


def plain_transformer(model, idx):
    """A vanilla forward: plain embeddings, one pass, the head."""
    return ref_run(model, model.wte.weight[idx], list(range(idx.size(1)))) @ model.lm_head.weight.T


def ref_ponderlm2(model, idx, thoughts=None):
    """PonderLM-2 as docs/method.md states it, token by token with no cache and no Jacobi iteration: token t's slot
    holds its embedding times sqrt(2.5 d) (1 when K = 0), each thought slot holds the final-norm output of the slot
    before it, all K+1 slots at position t, and the last slot's output is scored. Returns the logits (B, T, V) and
    the thoughts (B, T, K, d), None when K = 0. Given `thoughts`, uses them as the thought inputs instead (one pass,
    no recurrence)."""
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
        r = ref_blocks(model, r, list(range(idx.size(1))))
    return ref_final_norm(model, r) @ model.lm_head.weight.T


def ref_ponderlm(model, idx):
    """E = W[x] sqrt(d); X = E; K times: h = run(X), q = softmax(head(h)), X = E + q (sqrt(d) W); head(run(X))."""
    W, head, pos = model.wte.weight, model.lm_head.weight, list(range(idx.size(1)))
    E = W[idx] * math.sqrt(model.config.n_embd)
    X = E
    for _ in range(model.config.n_thoughts):
        X = E + (ref_run(model, X, pos) @ head.T).softmax(-1) @ (math.sqrt(model.config.n_embd) * W)
    return ref_run(model, X, pos) @ head.T


REFS = {"ponderlm2": lambda model, idx: ref_ponderlm2(model, idx)[0], "pause": ref_pause, "loop": ref_loop,
        "ponderlm": ref_ponderlm}


# ---- datasets and runs -----------------------------------------------------------------------------------------

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # é ✓\n\n" for i in range(200))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--micro_batch=4", "--batch_tokens=128",
        "--eval_windows=8", "--log_interval=1", "--warmup_iters=2", "--device=cpu", "--lr=3e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small byte-level dataset of 30 documents (so that val gets whole documents)."""
    out, _ = prep.claim(tmp_path_factory.mktemp("data") / "tiny", force=False)
    prep.prepare_documents(out, [TEXT[i * 300:(i + 1) * 300 + 700].encode() for i in range(30)],
                           prep.ByteTokenizer(), "test")
    return str(out)


def meta_of(dataset):
    """A plain dataset's meta.json as train.py's functions take it, made here rather than by common.load_dataset."""
    return {**json.loads((Path(dataset) / "meta.json").read_text()), "folder": Path(dataset), "align": 1,
            "targets": False}


def train_run(dataset, out, *args):
    """train.py in this process, on the tiny settings; returns what train.main returns."""
    return train.main([f"--dataset={dataset}", f"--out_dir={out}", *TINY, *args])


def train_command(dataset, out, *args):
    """The same as a command line, for a subprocess."""
    return [sys.executable, "train.py", f"--dataset={dataset}", f"--out_dir={out}", *TINY, *args]


def log_entries(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def log_losses(out):
    return {e["step"]: e["loss"] for e in log_entries(out) if "loss" in e}


def saved(out):
    """The checkpoint in out_dir."""
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)


def files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture(scope="module", params=[1, 2], ids=["K1", "K2"])
def trained(request, dataset, tmp_path_factory):
    """The folder of a short train.py run with K = 1 or 2 (a test that does not depend on K asks for K = 1 only)."""
    out = tmp_path_factory.mktemp(f"run_k{request.param}")
    train_run(dataset, out, f"--n_thoughts={request.param}", "--max_iters=5", "--eval_interval=5")
    return out


def one_line_error(main, argv, capsys):
    """The error with which a script's main refuses argv, checked to be one line: a Fail, or argparse's error line
    after its usage line."""
    try:
        main(argv)
    except SystemExit:
        err = capsys.readouterr().err
        assert err.count("\n") == 2 and "error:" in err, err
        return err.splitlines()[-1]
    except common.Fail as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    pytest.fail(f"{argv} was accepted")


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


def stop(p):
    """End a process a test started, and its children (torchrun's workers, which run in sessions of their own), if
    it is still running: a failing test leaves nothing behind."""
    if p.poll() is None:
        for pid in children(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        p.wait()


def run_job(cmd, timeout, **kw):
    """subprocess.run(cmd, capture_output=True, text=True), but a command that runs past timeout is ended with its
    children (subprocess.run would leave torchrun's workers running)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        stop(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def wait_for(p, text):
    """Read p's stdout until a line containing text; return the lines read."""
    lines = []
    while text not in (line := p.stdout.readline()):
        assert line, "".join(lines) + p.stderr.read()
        lines.append(line)
    return lines


# ================================================================================================================
# 1. The thought loop is the method. With (T-1)*K Jacobi passes the training forward equals an independent,
#    token-by-token reference, logits and gradients, for the Llama and the GPT-NeoX block; cached decoding equals it
#    too; with J = 3 the gap is real and shrinks with J; "exact" stops early in float32, at rounding level.
# ================================================================================================================

@pytest.mark.parametrize("K", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_jacobi_forward_and_gradients_equal_the_independent_reference(arch, K):
    """Claim 1 (training forward): with (T-1)*K Jacobi passes, the logits and the gradient of every parameter equal
    the reference's. A detached thought, a wrong slot, position or scale, a dropped bias or gain all show here."""
    model = tiny(K, arch=arch).train()
    idx, targets = tokens(), tokens(seed=2)
    ref_logits, _ = ref_ponderlm2(model, idx)
    ref_grads = grads(model, F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()))
    logits, loss = model(idx, targets, jacobi=(idx.size(1) - 1) * K)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    for name, g in grads(model, loss).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("K", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_cached_decoding_equals_the_independent_reference(arch, K):
    """Claim 1 (decoding): decoding token by token with the KV cache, and the forward with jacobi="exact", give the
    reference's logits."""
    model = tiny(K, arch=arch)
    idx = tokens()
    exact, _ = ref_ponderlm2(model, idx)
    torch.testing.assert_close(cached_decoding(model, idx), exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(model(idx, jacobi="exact")[0], exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2])
def test_the_gap_of_a_few_jacobi_passes_shrinks_with_j(K):
    """Claim 1 (the approximation): on 8 tokens J = 3 is not yet exact, and the gap to the reference shrinks from
    J = 1 to 3 to 5."""
    model = tiny(K)
    idx = tokens()
    exact, _ = ref_ponderlm2(model, idx)
    gaps = [(model(idx, jacobi=J)[0] - exact).abs().max().item() for J in (1, 3, 5)]
    assert gaps[1] > 1e-6, "J = 3 should not already be exact on 8 tokens"
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_exact_thoughts_stop_early_in_float32(monkeypatch):
    """Claim 1 (convergence): in float32, jacobi="exact" stops once the thoughts change at rounding level only, long
    before the T*K passes that guarantee exactness, with the logits of cached decoding up to float32 rounding."""
    model = tiny(1, dtype=torch.float32, block_size=64, seed=3)
    idx = tokens(T=64)
    passes = record_passes(model, monkeypatch)
    logits, _ = model(idx, jacobi="exact")
    assert len(passes) < 64 / 2, f"{len(passes)} passes: the rounding-level stop did not trigger"
    torch.testing.assert_close(logits, cached_decoding(model, idx), rtol=0, atol=1e-4)


# ================================================================================================================
# 2. Causality: no logit depends on a later token, for PonderLM-2 (K = 1, 2; J = 0, 1, 3) and every baseline.
# ================================================================================================================

@pytest.mark.parametrize("method, K, J", [("ponderlm2", K, J) for K in (1, 2) for J in (0, 1, 3)]
                         + [(method, 2, None) for method in BASELINES])
def test_causality(method, K, J):
    """Claim 2: changing the tokens after position t leaves every logit at positions <= t unchanged, and later
    positions do see the change."""
    model = tiny(K, method=method)
    idx = tokens()
    for t in [0, 3, 6]:
        other = idx.clone()
        other[:, t + 1:] = (other[:, t + 1:] + 1 + torch.arange(7 - t)) % 32
        a, b = model(idx, jacobi=J)[0], model(other, jacobi=J)[0]
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6


# ================================================================================================================
# 3. The cache and generation: an exact prefill followed by cached steps is exact; past block_size, generate
#    refills the context exactly (every method, block_size 1 too); cuDNN's attention is off while decoding, and
#    back on after.
# ================================================================================================================

@pytest.mark.parametrize("K", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_prefill_then_steps_equal_the_independent_reference(arch, K):
    """Claim 3 (the cache): an exact prefill of 5 tokens, then cached steps, give the reference's logits and thoughts
    at every position; a step past block_size is refused."""
    model = tiny(K, arch=arch)
    idx = tokens()
    exact, exact_thoughts = ref_ponderlm2(model, idx)
    cache = model.new_cache()
    logits, thoughts = model.prefill(idx[:, :5], cache, exact=True)
    assert thoughts.shape == (2, K, 16)
    for t in range(4, 8):
        if t > 4:
            logits, thoughts = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, exact[:, t], rtol=0, atol=1e-10)
        if K:
            torch.testing.assert_close(thoughts, exact_thoughts[:, t], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="past block_size"):
        model.step(idx[:, 0], cache)


@pytest.mark.parametrize("block_size", [8, 1])
@pytest.mark.parametrize("method", METHODS)
def test_generate_refills_the_context_exactly(method, block_size):
    """Claim 3 (generation): past block_size, generate keeps the last half of the context (at least one token) and
    goes on. Every greedy token must be the argmax of the independent reference over exactly that window, computed
    here from the rule alone, and come with its K thoughts."""
    model = tiny(1, method=method, block_size=block_size)
    T, seq = block_size, tokens(B=1, T=3)[0].tolist()
    out = list(model.generate(torch.tensor([seq]), max_new_tokens=40, temperature=0))
    assert len(out) == 40 and all(t.shape == (1,) and thoughts.shape == (1, 1, 16) for t, thoughts in out)
    start = max(0, len(seq) - T)                   # a prompt longer than the context: its last block_size tokens
    for i, (t, _) in enumerate(out):
        expected = REFS[method](model, torch.tensor([seq[start:]]))[0, -1].argmax().item()
        assert t.item() == expected, f"token {i} (window {start}..{len(seq)})"
        seq.append(t.item())
        if len(seq) - start > T:                   # the window is full: keep its last T/2 tokens, at least one
            start = len(seq) - max(1, T // 2)
    assert start > 0, "the test never reached the refill"


@pytest.mark.parametrize("method", METHODS)
def test_decoding_keeps_cudnn_attention_out(method, monkeypatch):
    """Claim 3 (attention kernels): cuDNN's attention builds a kernel plan per new key length (measured: sample.py at
    12 tokens/s on an H200), so attention over a KV cache runs with it switched off; whole sequences (S == L) may use
    it. It is back on afterwards, and a caller's own choice of kernels is kept."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.size(2) == k.size(2), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny(1, method=method, dtype=torch.float32, vocab_size=64, block_size=16, n_layer=1)
    list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert {cudnn for whole, cudnn, _ in seen if not whole} == {False}
    assert torch.backends.cuda.cudnn_sdp_enabled()             # and it is back on afterwards
    seen.clear()
    with sdpa_kernel(SDPBackend.MATH):                         # a caller's own choice of kernels is kept
        list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert seen and not any(flash for _, _, flash in seen)


# ================================================================================================================
# 4. K = 0 is a plain transformer: an independent vanilla forward, one pass only; the parameter count does not
#    depend on K; the embedding scale follows its rules.
# ================================================================================================================

@pytest.mark.parametrize("method", METHODS)
def test_k0_is_a_plain_transformer(method):
    """Claim 4: with K = 0 every method's logits equal an independent vanilla forward, and bitwise those of the
    vanilla model, with plain embeddings; the parameter count does not depend on K (Pause adds its one vector)."""
    model, vanilla = tiny(0, method=method), tiny(0)
    idx = tokens()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, plain_transformer(model, idx), rtol=0, atol=1e-10)
    assert torch.equal(logits, vanilla(idx)[0]) and model.emb_scale == 1.0
    added = [tiny(K, method=method).num_params() - vanilla.num_params() for K in (0, 1, 2, 3)]
    assert added == [0] + [16 if method == "pause" else 0] * 3, added


def test_k0_runs_one_pass(monkeypatch):
    """Claim 4 (cost): K = 0 runs one pass whatever J is; K = 1 runs K growing passes, J refinements and the final
    pass."""
    model, model1 = tiny(0), tiny(1)
    passes, passes1 = record_passes(model, monkeypatch), record_passes(model1, monkeypatch)
    model(tokens(), jacobi=3)
    model1(tokens(), jacobi=3)
    assert len(passes) == 1 and len(passes1) == 1 + 3 + 1


def test_embedding_scales():
    """Claim 4 (embedding scale): sqrt(2.5 d) with thoughts, 1 without, each baseline its own (Pause sqrt(d), Loop
    sqrt(2.5 d)), --emb_scale overrides any of them; the init makes a scaled embedding's RMS about 1."""
    d = 16
    assert tiny(1).emb_scale == math.sqrt(2.5 * d) and tiny(0).emb_scale == 1.0
    assert tiny(0, emb_scale="sqrt_2.5d").emb_scale == math.sqrt(2.5 * d)
    assert tiny(1, emb_scale="1").emb_scale == 1.0
    assert tiny(3, method="pause").emb_scale == math.sqrt(d) and tiny(0, method="pause").emb_scale == 1.0
    assert tiny(3, method="loop").emb_scale == math.sqrt(2.5 * d)
    assert tiny(3, method="ponderlm", emb_scale="sqrt_2.5d").emb_scale == math.sqrt(2.5 * d)
    with pytest.raises(ValueError, match="emb_scale"):
        PonderConfig(emb_scale="2")
    model = PonderLM(PonderConfig(vocab_size=256, n_embd=256, n_thoughts=1))
    rms = model.embed(torch.arange(256)).pow(2).mean().sqrt().item()
    assert 0.9 < rms < 1.1, rms


# ================================================================================================================
# 5. The baselines (Pause, Loop, PonderLM): each equals its reference, its cached decoding equals its forward,
#    gradients reach every parameter, its FLOPs equal a count by hand.
# ================================================================================================================

@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_matches_its_reference(method, K):
    """Claim 5: each baseline's forward equals its reference, written from docs/method.md#the-baselines."""
    model = tiny(K, method=method)
    idx = tokens()
    torch.testing.assert_close(model(idx)[0], REFS[method](model, idx), rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_cached_decoding_equals_the_forward(method, K):
    """Claim 5: a baseline's prefill of 3 tokens, then cached steps, give its forward's logits at every position; a
    step past block_size is refused."""
    model = tiny(K, method=method)
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
def test_baseline_gradients_reach_every_parameter(method):
    """Claim 5: the loss of a baseline has a gradient for every parameter (PonderLM's softmax passes included)."""
    model = tiny(2, method=method).train()
    _, loss = model(tokens(), tokens(seed=2))
    for name, g in grads(model, loss).items():
        assert g.abs().sum() > 0, f"{name} received no gradient"


def test_baseline_flops_by_hand():
    """Claim 5: the cost table of docs/method.md, forward FLOPs per token, for K = 3; training is 3x."""
    K, L, d, T, V = 3, 2, 16, 8, 32
    N = sum(p.numel() for p in tiny(K, method="loop").blocks.parameters() if p.dim() == 2)
    forward = {"pause": (K + 1) * 2 * N + 4 * L * d * (K + 1) ** 2 * T + 2 * d * V,
               "loop": (K + 1) * (2 * N + 4 * L * d * T) + 2 * d * V,
               "ponderlm": (K + 1) * (2 * N + 4 * L * d * T) + (2 * K + 1) * 2 * d * V}
    for method, f in forward.items():
        model = tiny(K, method=method)
        assert model.flops_per_token(training=False) == f, method
        assert model.flops_per_token() == 3 * f, method


# ================================================================================================================
# 6. Cheaper training: --grad_passes=n backpropagates through the last n passes only.
# ================================================================================================================

def test_grad_passes_through_all_changes_nothing_and_2_is_neither_1_nor_all():
    """Claim 6: --grad_passes equal to the number of passes (K + J + 1) gives bitwise the default's gradients; 2 gives
    gradients other than 1's and than all passes'."""
    model = tiny(1).train()
    idx, targets = tokens(), tokens(seed=2)
    g = {}
    for n in (0, 1, 2, 1 + 3 + 1):
        model.config.grad_passes = n
        g[n] = grads(model, model(idx, targets, jacobi=3)[1])
    for name in g[0]:
        assert torch.equal(g[5][name], g[0][name]), name
    assert not torch.allclose(g[2]["wte.weight"], g[1]["wte.weight"])
    assert not torch.allclose(g[2]["wte.weight"], g[0]["wte.weight"])


@pytest.mark.parametrize("K", [1, 2])
def test_grad_passes_1_is_the_final_pass_on_constant_exact_thoughts(K):
    """Claim 6: with --grad_passes=1 and enough passes, the loss is the exact loss, and the gradients are those of
    the final pass with the reference's exact thoughts held constant."""
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
    """Claim 6: --grad_passes=n runs exactly the last n of the K + J + 1 passes with gradients (0: all)."""
    model = tiny(1, grad_passes=n).train()
    modes = record_passes(model, monkeypatch)
    model(tokens(), tokens(), jacobi=3)
    assert len(modes) == 1 + 3 + 1
    assert modes == [False] * (5 - n) + [True] * n if n else modes == [True] * 5, modes


def test_grad_passes_flops_by_hand():
    """Claim 6: K = 1, J = 3: passes of 1, 2, 2, 2 slots per token, then the final 2-slot pass with the head; the
    passes with gradients cost 3x their forward, the others 1x."""
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


# ================================================================================================================
# 7. The training step: accumulation, and 2 DDP ranks, equal one big SGD step; evaluation does not depend on the
#    ranks or the micro-batch and uses jacobi_eval; the learning-rate schedule; compiled bf16 against eager; FLOP
#    counts; one batch overfits; the loss at initialisation.
# ================================================================================================================

def test_loss_at_init_and_gradients():
    """Claim 7 (initialisation): the loss at init is about log V, and every parameter gets a gradient."""
    torch.manual_seed(0)
    model = PonderLM(PonderConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64, n_thoughts=1))
    idx = torch.randint(256, (4, 33))
    model.train()
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.4, loss.item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"


@pytest.mark.parametrize("K", [0, 1])
def test_overfits_one_batch(K):
    """Claim 7 (learning): 150 AdamW steps on one batch drive its loss below 0.05."""
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


class SGD(torch.optim.SGD):
    """Plain SGD standing in for AdamW in the tests: a step is w - lr * g, so a gradient off by any factor shows
    (AdamW and clipping would hide it)."""

    def __init__(self, groups, lr, **_):
        super().__init__(groups, lr=lr)


SGD_ARGS = ["--grad_clip=0", "--weight_decay=0", "--warmup_iters=0", "--max_iters=2", "--eval_interval=2", "--lr=0.5"]


def reference_sgd(dataset, out, ranks, accum):
    """The run in `out` recomputed without train.py's loop: per step, ONE forward over the sequences of every rank
    and micro-step together, the mean loss, w -= lr * grad. Uses the model's forward (not under test here)."""
    ckpt = saved(out)
    cfg = train.TrainConfig(**ckpt["train_config"])
    torch.manual_seed(cfg.seed)
    model = build(cfg.method, PonderConfig(**ckpt["model_config"])).train()
    meta = meta_of(dataset)
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
    """Claim 7 (accumulation): 2 micro-steps of 4 sequences, then plain SGD, equal one forward and backward over the
    8 sequences together (a loss not divided by the micro-steps shows here)."""
    monkeypatch.setattr(torch.optim, "AdamW", SGD)
    train_run(dataset, tmp_path, *SGD_ARGS, "--batch_tokens=128", "--micro_batch=4")
    assert_same_weights(saved(tmp_path)["model"], reference_sgd(dataset, tmp_path, ranks=1, accum=2))


def test_two_accumulating_ranks_equal_one_big_step(dataset, tmp_path):
    """Claim 7 (DDP): 2 gloo ranks x 2 micro-steps, with gradients through the last 2 passes only, equal one big SGD
    step: the no-grad passes must not disturb DDP, gradients must be synchronised on the last micro-step and
    averaged. The step-0 evaluation, split over the 2 ranks, equals one made here on 1 rank with micro-batch 3."""
    runner = tmp_path / "run_sgd.py"                # train.py with SGD for AdamW, in each of the 2 processes
    runner.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport torch\nimport train\n\n\n"
                      f"{inspect.getsource(SGD)}\n\ntorch.optim.AdamW = SGD\ntrain.main(sys.argv[1:])\n")
    args = [f"--dataset={dataset}", *TINY, *SGD_ARGS, "--batch_tokens=256", "--micro_batch=4", "--grad_passes=2",
            f"--out_dir={tmp_path / 'two'}"]
    result = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      str(runner), *args], timeout=300, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 seqs x 16 x 2 ranks x 2 accumulation" in result.stdout
    assert_same_weights(saved(tmp_path / "two")["model"], reference_sgd(dataset, tmp_path / "two", ranks=2, accum=2))
    cfg = train.TrainConfig(**{**saved(tmp_path / "two")["train_config"], "micro_batch": 3})
    torch.manual_seed(cfg.seed)
    model = build("ponderlm2", PonderConfig(vocab_size=256, **{k: getattr(cfg, k) for k in common.MODEL_KEYS}))
    val0 = train.evaluate(model, meta_of(dataset), cfg, "cpu", train.nullcontext(), 0, 1)
    assert log_entries(tmp_path / "two")[0] == {"step": 0, "val_loss": pytest.approx(val0, abs=1e-6)}


def test_evaluation_uses_jacobi_eval_passes(dataset, monkeypatch):
    """Claim 7 (evaluation): in eval mode the model runs jacobi_eval refinement passes, in training a J drawn from
    [jacobi_min, jacobi_max]; train.py's evaluation runs its windows in eval mode and leaves the model training."""
    model = tiny(1, dtype=torch.float32, vocab_size=256, block_size=16, jacobi_eval=4).train()
    passes = record_passes(model, monkeypatch)
    model.eval()
    model(tokens())
    assert len(passes) == 1 + 4 + 1                  # K growing passes, jacobi_eval refinements, the final pass
    passes.clear()
    model.train()
    model(tokens())
    assert len(passes) in (1 + 2 + 1, 1 + 3 + 1)      # in training J is drawn from [jacobi_min, jacobi_max]
    passes.clear()
    cfg = train.TrainConfig(block_size=16, micro_batch=4, eval_windows=8, jacobi_eval=4)
    train.evaluate(model, meta_of(dataset), cfg, "cpu", train.nullcontext(), 0, 1)
    assert len(passes) == 2 * (1 + 4 + 1) and model.training      # 2 batches of 4 windows; back in train mode


def test_lr_schedule():
    """Claim 7 (schedule): linear warmup, a cosine down to min_lr_ratio, then that floor, value by value."""
    cfg = train.TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    lr = [train.lr_at(cfg, s) for s in range(130)]
    assert lr[0] == pytest.approx(0.1) and lr[4] == pytest.approx(0.5) and lr[9] == lr[10] == 1.0   # warmup
    assert lr[60] == pytest.approx(0.55)                             # half way down the cosine: (1 + 0.1) / 2
    assert all(a > b for a, b in zip(lr[10:110], lr[11:111]))         # decreasing all the way
    assert lr[110:] == [pytest.approx(0.1)] * 20                      # then the floor
    cfg.lr_decay_iters, cfg.max_iters = 110, 200                      # a run extended past its schedule
    assert train.lr_at(cfg, 150) == pytest.approx(0.1) and train.lr_at(cfg, 60) == pytest.approx(0.55)


def test_compiled_bf16_training_matches_eager(dataset, tmp_path, monkeypatch):
    """Claim 7 (compiled training): train.py's CUDA path on the CPU, every block compiled (aot_eager: the graphs,
    without code generation) under bf16 autocast, against eager bf16. The graphs must not depend on J."""
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


def test_flops():
    """Claim 7 (FLOP counts): K = 1 decodes a token with the matmul work of K = 0 with twice the layers; a K = 1
    training step costs about (3 + 2J) times the vanilla one; the vanilla count equals the formula."""
    L, K1 = tiny(0, n_layer=4), tiny(1, n_layer=2)
    N = sum(p.numel() for p in K1.blocks.parameters() if p.dim() == 2)
    attn = lambda m, slots: 4 * m.config.n_layer * 16 * slots * 8 * slots  # noqa: E731
    assert L.flops_per_token(training=False) - attn(L, 1) == K1.flops_per_token(training=False) - attn(K1, 2)
    V0 = tiny(0, n_layer=2)
    assert V0.flops_per_token() == 3 * (2 * N + 4 * 2 * 16 * 8 + 2 * 16 * 32)
    ratio = K1.flops_per_token(jacobi=2) / V0.flops_per_token()
    assert 5 < ratio < 3 + 2 * 2 + 4, ratio


def test_batch_layout_fits_any_number_of_ranks():
    """Claim 7 (the batch): the default batch is shared by 1 to 8 ranks within 5 %; given values are kept exactly, or
    refused in one line when the ranks cannot share them."""
    gpu = train.TrainConfig(**{f.name: f.metadata["gpu"] for f in dataclasses.fields(train.TrainConfig)
                               if f.metadata["gpu"] is not None})                     # the CUDA defaults
    assert (gpu.batch_tokens, gpu.micro_batch, gpu.block_size) == (32768, 64, 256)
    for world in range(1, 9):
        micro, accum, batch = common.batch_layout(gpu, set(), world)
        assert micro * accum * 256 * world == batch and micro <= 64, world
        assert abs(batch / 32768 - 1) < 0.05, (world, batch)
    assert common.batch_layout(gpu, set(), 1) == (64, 2, 32768) and common.batch_layout(gpu, set(), 8) == (16, 1, 32768)
    assert common.batch_layout(train.TrainConfig(), set(), 1) == (8, 1, 1024)          # the CPU defaults
    assert common.batch_layout(gpu, {"batch_tokens"}, 4) == (32, 1, 32768)             # given: kept exactly
    with pytest.raises(train.Fail, match="not a multiple"):
        common.batch_layout(gpu, {"batch_tokens", "micro_batch"}, 3)


def test_bf16_and_peak_flops_follow_the_gpu(monkeypatch):
    """Claim 7 (the machine): bf16 only where the GPU computes it natively; the peak FLOP/s for the MFU by the
    longest device name that matches, none where there is no published figure."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert common.pick_device("cuda", "auto")[2] == "float32"         # emulated only (pre-Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert common.pick_device("cuda", "auto")[2] == "bfloat16"
    for name, peak in [("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA A10G", None), ("NVIDIA A10", 125e12), ("NVIDIA H200", 989e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert common.peak_flops("cuda", "bfloat16") == peak, name


# ================================================================================================================
# 8. Where a run starts: resuming equals not stopping; options given on resume apply; a finished run extended keeps
#    its schedule; --init_from=PATH starts from another run's weights, or from a Hugging Face GPT-NeoX folder (whose
#    logits are GPT-NeoX's; the loader refuses anything else in one line, and reads newer config names).
# ================================================================================================================

def test_resume_equals_uninterrupted(dataset, tmp_path):
    """Claim 8 (resume): 3 steps, a stop, and the same command again give the losses and weights of 6 steps in one
    go."""
    train_run(dataset, tmp_path / "a", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3")
    train_run(dataset, tmp_path / "b", "--max_iters=3", "--lr_decay_iters=6", "--eval_interval=3")
    train_run(dataset, tmp_path / "b", "--max_iters=6")          # --init_from=auto finds the checkpoint
    a, b = log_losses(tmp_path / "a"), log_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    b_weights = saved(tmp_path / "b")["model"]
    for k, w in saved(tmp_path / "a")["model"].items():
        torch.testing.assert_close(w, b_weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_applies_the_options_given_now(dataset, tmp_path):
    """Claim 8 (resume): weight decay and betas given on resume reach the restored optimizer and the checkpoint."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    train_run(dataset, tmp_path, "--max_iters=3", "--weight_decay=0.05", "--beta2=0.99")
    ckpt = saved(tmp_path)
    decayed, rest = ckpt["optimizer"]["param_groups"]
    assert decayed["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert tuple(decayed["betas"]) == tuple(rest["betas"]) == (0.9, 0.99)
    assert ckpt["train_config"]["weight_decay"] == 0.05 and ckpt["train_config"]["beta2"] == 0.99


def test_extending_a_finished_run_keeps_its_schedule(dataset, tmp_path):
    """Claim 8 (resume): a larger --max_iters after the end goes on at the floor of the cosine, not a new one."""
    train_run(dataset, tmp_path, "--max_iters=4", "--eval_interval=4")
    train_run(dataset, tmp_path, "--max_iters=6", "--eval_interval=2")
    lrs = {e["step"]: e["lr"] for e in log_entries(tmp_path) if "lr" in e}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[5] == lrs[6] == pytest.approx(3e-3 * 0.1)             # the floor, not a restarted cosine
    assert saved(tmp_path)["train_config"]["lr_decay_iters"] == 4


def test_a_new_run_from_another_runs_weights(dataset, tmp_path):
    """Claim 8 (--init_from=PATH): the weights arrive unchanged (the new run's step-0 evaluation equals the source's
    last), the optimizer state and the schedule do not (a new run), K may change and the run trains, the source's
    embedding scale is kept, the same command resumes, the source is untouched, and what cannot fit fails in one
    line."""
    src = tmp_path / "src"
    train_run(dataset, src, "--n_thoughts=0", "--max_iters=3", "--eval_interval=3")
    src_val = log_entries(src)[-1]["val_loss"]
    train_run(dataset, tmp_path / "same", f"--init_from={src}", "--max_iters=1")
    assert log_entries(tmp_path / "same")[0] == {"step": 0, "val_loss": src_val}
    new = tmp_path / "k1"
    train_run(dataset, new, f"--init_from={src / 'ckpt.pt'}", "--n_thoughts=1", "--max_iters=2", "--eval_interval=2")
    ckpt = saved(new)
    assert ckpt["step"] == 2 and ckpt["model_config"]["n_thoughts"] == 1
    assert ckpt["model_config"]["emb_scale"] == "1"                  # the source was trained without a scale
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}    # AdamW counts from 0 again
    assert saved(src)["step"] == 3                                   # the source is untouched
    train_run(dataset, new, f"--init_from={src / 'ckpt.pt'}", "--n_thoughts=1", "--max_iters=3")
    assert saved(new)["step"] == 3                                   # the same command resumes
    with pytest.raises(train.Fail, match="did not start from"):
        train_run(dataset, new, f"--init_from={tmp_path / 'same'}", "--max_iters=4")
    with pytest.raises(train.Fail, match="cannot start from .*n_embd=32, not 64"):
        train_run(dataset, tmp_path / "wide", f"--init_from={src}", "--n_embd=64")
    with pytest.raises(train.Fail, match="no checkpoint there"):
        train_run(dataset, tmp_path / "none", f"--init_from={tmp_path / 'nothing'}")
    assert not (tmp_path / "wide").exists() and not (tmp_path / "none").exists()


# ---- a Hugging Face GPT-NeoX checkpoint folder, made here --------------------------------------------------------

# Pythia's config.json keys, for a tiny model: head size 16, of which rotary turns 4 (two frequencies, so the pairing
# of dimensions matters). A rotary base and LayerNorm eps other than the defaults show that both are read.
HF_CONFIG = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
             "hidden_act": "gelu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 128,
             "layer_norm_eps": 1e-3, "max_position_embeddings": 12, "num_attention_heads": 2, "num_hidden_layers": 2,
             "rotary_emb_base": 500, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
             "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 40}
HF_AS_PONDER = dict(arch="neox", vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=32, rotary_pct=0.25,
                    rope_theta=500.0, norm_eps=1e-3, n_thoughts=0, emb_scale="1")


def hf_weights(cfg=HF_CONFIG, seed=0):
    """Random weights under Hugging Face's names and layouts (query_key_value grouped per head), plus the buffers
    older checkpoints such as Pythia's carry (causal mask, masked_bias, inv_freq)."""
    g = torch.Generator().manual_seed(seed)
    d, V, T = cfg["hidden_size"], cfg["vocab_size"], cfg["max_position_embeddings"]

    def rand(*shape, std=1 / math.sqrt(d), mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    w = {"gpt_neox.embed_in.weight": rand(V, d, std=1.0), "embed_out.weight": rand(V, d),
         "gpt_neox.final_layer_norm.weight": rand(d, std=0.2, mean=1.0), "gpt_neox.final_layer_norm.bias": rand(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = rand(d, std=0.2, mean=1.0), rand(d, std=0.2)
        for name, rows, cols in [("attention.query_key_value", 3 * d, d), ("attention.dense", d, d),
                                 ("mlp.dense_h_to_4h", 4 * d, d), ("mlp.dense_4h_to_h", d, 4 * d)]:
            w[p + name + ".weight"], w[p + name + ".bias"] = rand(rows, cols, std=1 / math.sqrt(cols)), rand(rows)
        w[p + "attention.bias"] = torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T)
        w[p + "attention.masked_bias"] = torch.tensor(-1e9)
        w[p + "attention.rotary_emb.inv_freq"] = 1 / 500 ** (torch.arange(0, 4, 2).float() / 4)
    return w


def hf_neox_logits(w, cfg, idx):
    """GPTNeoXForCausalLM's logits, float64, written from the checkpoint's own tensors and names (independent of
    pretrained.py's mapping too): each head's [q_h, k_h, v_h] cut from the fused query_key_value output, rotary by
    rotate_half on the first rotary_pct of each head, attention and MLP both added to the block's input, the final
    LayerNorm, embed_out."""
    w = {k: v.double() for k, v in w.items()}
    d, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hs = d // nh
    r = int(hs * cfg["rotary_pct"])
    B, T = idx.shape
    inv_freq = cfg["rotary_emb_base"] ** -(torch.arange(0, r, 2).double() / r)
    angles = torch.outer(torch.arange(T).double(), inv_freq).repeat(1, 2)           # (T, r): [f, f]
    cos, sin = angles.cos().float().double(), angles.sin().float().double()         # float32 tables

    def rope(t):                                             # t: (B, nh, T, hs)
        rot = t[..., :r]
        half = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], dim=-1)
        return torch.cat([rot * cos + half * sin, t[..., r:]], dim=-1)

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x, name):
        return ref_layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps)

    x = w["gpt_neox.embed_in.weight"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        qkv = linear(norm(x, p + "input_layernorm"), p + "attention.query_key_value")
        qkv = qkv.view(B, T, nh, 3 * hs).transpose(1, 2)                             # (B, nh, T, 3 hs)
        q, k, v = rope(qkv[..., :hs]), rope(qkv[..., hs:2 * hs]), qkv[..., 2 * hs:]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
        attn = linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d), p + "attention.dense")
        mlp = linear(ref_gelu(linear(norm(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")),
                     p + "mlp.dense_4h_to_h")
        x = x + attn + mlp
    return norm(x, "gpt_neox.final_layer_norm") @ w["embed_out.weight"].T


def write_safetensors(tensors, path):
    """torch.save's signature, the safetensors format, written by hand: an 8-byte little-endian header length, a
    JSON header {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes as the reference writer does,
    then the raw bytes."""
    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int8: "I8", torch.bool: "BOOL"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def hf_folder(folder, weights, cfg=HF_CONFIG, form="safetensors"):
    """A checkpoint folder: config.json and the weights as model.safetensors, pytorch_model.bin, or either one
    split in two shards with an .index.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    kind = form.split()[-1]
    save = write_safetensors if kind == "safetensors" else torch.save
    prefix, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    if not form.startswith("sharded"):
        save(weights, folder / f"{prefix}.{ext}")
        return folder
    names = list(weights)
    weight_map = {}
    for i, part in enumerate([names[:len(names) // 2], names[len(names) // 2:]]):
        file = f"{prefix}-0000{i + 1}-of-00002.{ext}"
        save({n: weights[n] for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / f"{prefix}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def hf_dataset(folder, tokenizer, vocab, n=600, seed=0):
    """A dataset of random token ids said to be made with `tokenizer`."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        rng.integers(0, vocab, size=n).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer=tokenizer, vocab_size=vocab, train_tokens=n,
                                                      val_tokens=n)))
    return folder


@pytest.mark.parametrize("form, dtype", [("safetensors", torch.float32), ("bin", torch.float32),
                                         ("sharded safetensors", torch.bfloat16), ("sharded bin", torch.float16),
                                         ("safetensors", torch.float16)])
def test_a_gpt_neox_checkpoint_gives_the_logits_gpt_neox_defines(tmp_path, form, dtype):
    """Claim 8 (a Hugging Face folder): loaded and run in float64, the K = 0 neox model equals GPT-NeoX computed from
    the checkpoint's own tensors, from every file layout. fp16 and bf16 weights convert to float32 exactly, so both
    sides hold the same numbers. The same weights fit any K."""
    w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_weights().items()}
    config, state = pretrained.load_neox(hf_folder(tmp_path / "ckpt", w, form=form))
    assert config == HF_AS_PONDER
    assert {t.dtype for t in state.values()} == {torch.float32}
    model = PonderLM(PonderConfig(**config))
    model.load_state_dict(state)                             # strict: exactly ponder's parameters, nothing left out
    model = model.double().eval()
    idx = torch.randint(40, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, hf_neox_logits(w, HF_CONFIG, idx), rtol=0, atol=1e-10)
    PonderLM(PonderConfig(**{**config, "n_thoughts": 2})).load_state_dict(state)   # thoughts add no parameters


@pytest.mark.parametrize("keys", [{"partial_rotary_factor": 0.25, "rope_theta": 500},
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 500,
                                                       "partial_rotary_factor": 0.25}}])
def test_newer_names_of_the_rotary_settings(tmp_path, keys):
    """Claim 8 (a Hugging Face folder): newer transformers' names of the rotary settings, at the top level or in
    rope_parameters, are read like Pythia's."""
    cfg = {k: v for k, v in HF_CONFIG.items() if k not in ("rotary_pct", "rotary_emb_base")}
    config, _ = pretrained.load_neox(hf_folder(tmp_path / "ckpt", hf_weights(), {**cfg, **keys}))
    assert config == HF_AS_PONDER


def set_config(**kw):
    return lambda cfg, w: cfg.update(kw)


def set_weight(name, value):
    return lambda cfg, w: w.update({name: value(w)})


LOADER_REFUSALS = {
    "llama": (set_config(model_type="llama"), "model_type is 'llama'"),
    "sequential residual": (set_config(use_parallel_residual=False), "use_parallel_residual is false"),
    "tanh gelu": (set_config(hidden_act="gelu_new"), "hidden_act is 'gelu_new'"),
    "mlp width": (set_config(intermediate_size=96), "intermediate_size 96 is not 4 * hidden_size"),
    "tied embeddings": (set_config(tie_word_embeddings=True), "tie_word_embeddings is true"),
    "rope scaling": (set_config(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling is set"),
    "no attention bias": (set_config(attention_bias=False), "attention_bias is false"),
    "odd rotary dims": (set_config(rotary_pct=0.1), "rotary_pct (0.1)"),
    "wrong shape": (set_weight("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", lambda w: torch.zeros(127, 32)),
                    "gpt_neox.layers.1.mlp.dense_h_to_4h.weight has shape (127, 32), config.json implies (128, 32)"),
    "missing tensor": (lambda cfg, w: w.pop("gpt_neox.layers.0.attention.dense.bias"),
                       "missing tensor gpt_neox.layers.0.attention.dense.bias"),
    "unexpected tensor": (set_weight("gpt_neox.layers.0.attention.gate.weight", lambda w: torch.zeros(2)),
                          "unexpected tensor gpt_neox.layers.0.attention.gate.weight"),
    "quantized": (set_weight("embed_out.weight", lambda w: w["embed_out.weight"].to(torch.int8)), "torch.int8"),
}


@pytest.mark.parametrize("case", LOADER_REFUSALS)
def test_anything_but_gpt_neox_as_pythia_is_refused_in_one_line(tmp_path, case):
    """Claim 8 (the loader's refusals): a config or weights that ponder would not compute exactly are refused with
    one line that says what differs."""
    change, message = LOADER_REFUSALS[case]
    cfg, w = dict(HF_CONFIG), hf_weights()
    change(cfg, w)
    folder = hf_folder(tmp_path / "ckpt", w, cfg)
    with pytest.raises(ValueError) as e:
        pretrained.load_neox(folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["no folder", "no config", "bad config", "no weights", "missing shard", "truncated"])
def test_missing_or_damaged_checkpoint_files_are_refused_in_one_line(tmp_path, case):
    """Claim 8 (the loader's refusals): a missing folder, config, weights file or shard, a config that is not JSON,
    or a truncated safetensors file, is one line that says which."""
    folder = hf_folder(tmp_path / "ckpt", hf_weights(), form="sharded safetensors" if case == "missing shard"
                       else "safetensors")
    weights = folder / "model.safetensors"
    if case == "no folder":
        folder = tmp_path / "elsewhere"
    elif case == "no config":
        (folder / "config.json").unlink()
    elif case == "bad config":
        (folder / "config.json").write_text('{"model_type": "gpt_neox",')
    elif case == "no weights":
        weights.unlink()
    elif case == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    message = {"no folder": "no such folder", "no config": "no config.json", "bad config": "is not valid JSON",
               "no weights": "no weights",
               "missing shard": "lists model-00002-of-00002.safetensors", "truncated": "truncated"}[case]
    with pytest.raises(ValueError) as e:
        pretrained.load_neox(folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_train_from_a_hugging_face_folder(tmp_path):
    """Claim 8 (--init_from=DIR, a GPT-NeoX folder): the weights arrive as the folder defines them (the new run's
    step-0 evaluation equals one made here from the loader's model), the neox settings come along (rotary_pct,
    scale 1, J up to 4), K may change, and a dataset made with another tokenizer is refused."""
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
    first = log_entries(tmp_path / "k0")[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(expected, abs=1e-6)
    train.main([*args, "--out_dir", str(tmp_path / "k1"), "--n_thoughts=1", "--max_iters=2"])
    ckpt = saved(tmp_path / "k1")
    mc, tc = ckpt["model_config"], ckpt["train_config"]
    assert (mc["arch"], mc["rotary_pct"], mc["emb_scale"], mc["n_thoughts"], mc["jacobi_max"]) == ("neox", 0.25, "1", 1, 4)
    assert ckpt["step"] == 2 and tc["init_from"] == str(folder)
    other = hf_dataset(tmp_path / "bytes", "bytes", 64)
    with pytest.raises(train.Fail, match="has a vocabulary of 64 .* needs 64 \\(bytes\\)"):
        train.main([*args[1:], f"--dataset={other}", "--out_dir", str(tmp_path / "k2"), "--max_iters=1"])


# ================================================================================================================
# 9. Data: prepare.py (text, the stdlib, downloads, a big file streamed, its messages, empty splits), per-token
#    targets and aligned windows, damaged datasets, dataset names, tokenizers (a Hugging Face tokenizer.json; those
#    tests are skipped without the tokenizers package).
# ================================================================================================================

def test_prepare_text_file(tmp_path):
    """Claim 9 (prepare.py text): a text file becomes 90 % train and 10 % val bytes, which decode to the text."""
    src = tmp_path / "notes.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prep.prepare_text(src, out=tmp_path / "notes")
    n = len(TEXT.encode("utf-8"))
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(0.9 * n), n - int(0.9 * n))
    assert json.loads((tmp_path / "notes" / "meta.json").read_text())["vocab_size"] == 256
    ids = np.concatenate([np.fromfile(tmp_path / "notes" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert prep.ByteTokenizer().decode(ids.tolist()) == TEXT


def test_prepare_text_skips_binary_files_in_a_folder(tmp_path, capsys):
    """Claim 9 (prepare.py text): in a folder, files with NUL bytes (images, archives) are skipped with a note and
    the text files alone are tokenized; a folder of binary files only is refused; a binary file named on its own is
    tokenized as given, with a note."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text(TEXT[:3000])
    (folder / "b.txt").write_text(TEXT[3000:6000])
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 20)
    meta = prep.prepare_text(folder, out=tmp_path / "d")
    assert meta["train_tokens"] + meta["val_tokens"] == len(TEXT[:6000].encode())
    assert "skipping 1 binary file(s)" in capsys.readouterr().out
    only = tmp_path / "bin"
    only.mkdir()
    (only / "x.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="only binary files"):
        prep.prepare_text(only, out=tmp_path / "e")
    assert not (tmp_path / "e").exists()
    meta = prep.prepare_text(only / "x.bin", out=tmp_path / "f")
    assert meta["train_tokens"] + meta["val_tokens"] == 100 and "looks binary" in capsys.readouterr().out


def test_prepare_refuses_to_overwrite_or_escape_data(tmp_path, monkeypatch):
    """Claim 9 (prepare.py): an existing dataset is replaced only with --force, a name cannot leave data/, and an
    empty file leaves no folder behind."""
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


def test_prepare_messages_and_empty_splits(tmp_path, monkeypatch):
    """Claim 9 (prepare.py's messages): the stdlib corpus is not prepared over an existing one, a file name that
    cannot name a dataset asks for --name, an empty val split is refused, and an offline tokenizer or download says
    so; none of them leaves a folder behind."""
    monkeypatch.setattr(prep, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(prep.prepare_stdlib, "__defaults__", (tmp_path / "data" / "stdlib", False))
    (tmp_path / "data" / "stdlib").mkdir(parents=True)
    (tmp_path / "data" / "stdlib" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a dataset; pass --force to replace it$"):
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
    assert files(tmp_path / "data") == ["stdlib"]


def test_download_resumes_and_fails_clearly_offline(tmp_path):
    """Claim 9 (downloads): an interrupted download resumes from its .part file (a local server stands in for the
    network); with nothing to reach, the error says this dataset needs the network."""
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


def test_prepare_text_streams_a_big_file(tmp_path):
    """Claim 9 (streaming): a 40 MB text file is prepared with far less memory than the old 29x the file's size. The
    peak is the preparing process's own (VmHWM): ru_maxrss would count the test runner's memory too, which Linux
    carries over into a child it starts."""
    big = tmp_path / "big.txt"
    big.write_bytes((TEXT.encode() * 4400)[:40_000_000])
    code = ("import re, sys; sys.path.insert(0, sys.argv[1]); from data.prepare import prepare_text; "
            "prepare_text(sys.argv[2], out=sys.argv[3]); "
            "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())[1])")
    r = subprocess.run([sys.executable, "-c", code, str(REPO), str(big), str(tmp_path / "big")], capture_output=True,
                       text=True, check=True, env=ENV)
    peak_mb = int(r.stdout.split()[-1]) / 1024
    assert peak_mb < 400, f"{peak_mb:.0f} MB"


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
    """Claim 9 (per-token targets): windows start at multiples of align, targets come from the targets file, the
    evaluation scores only the positions that have one (equal to a loss computed here), and a file of the wrong
    length, or too few tokens for a window, is refused."""
    data = masked_dataset(tmp_path / "sums")
    meta = common.load_dataset(str(data), 12, True)
    cfg = train.TrainConfig(block_size=12, micro_batch=4, eval_windows=10)
    offsets = np.concatenate([train.train_offsets(meta, cfg, s, 0) for s in range(20)])
    assert (offsets % 12 == 0).all() and offsets.max() <= 40 * 12 - 12 and len(set(offsets)) > 10
    x, y = train.get_batch(meta, "train", offsets[:4], 12, "cpu")
    ids = np.fromfile(data / "train.bin", dtype=np.uint16).reshape(40, 12)
    for row, o in enumerate(offsets[:4]):
        assert x[row].tolist() == ids[o // 12].tolist()
        assert y[row].tolist() == [(-1 if i % 2 == 0 else int(ids[o // 12][:i + 1].sum() % 7)) for i in range(12)]
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


@pytest.mark.parametrize("damage", ["odd train.bin", "id past the vocabulary", "no tokenizer", "vocab as text",
                                    "not an object"])
def test_a_damaged_dataset_is_one_line_before_any_work(dataset, tmp_path, damage):
    """Claim 9 (damaged datasets): a data file cut short or holding ids past the vocabulary, or a meta.json without
    what train.py needs, is one line that says to prepare the dataset again, before any out_dir is made."""
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


def test_dataset_names_resolve_from_anywhere(dataset, tmp_path, monkeypatch):
    """Claim 9 (dataset names): --dataset=tiny/, data/tiny and tiny, from another directory, all find data/tiny."""
    repo = tmp_path / "repo"
    shutil.copytree(dataset, repo / "data" / "tiny")
    monkeypatch.setattr(common, "REPO", repo)
    monkeypatch.setattr(common, "DATA_DIR", repo / "data")
    monkeypatch.chdir(tmp_path)
    for name in ["tiny/", "data/tiny", "tiny"]:
        assert common.load_dataset(name, 16, True)["folder"] == repo / "data" / "tiny", name


# ---- a checkpoint's tokenizer ----------------------------------------------------------------------------------

TEXTS = ["Hello world, the quick brown fox.", "naïve café — déjà vu ✓ 東京 🙂\n\tend",
         "def f(x):\n        return x  # ok"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tiny byte-level BPE trained here, set up like GPT-NeoX's: NFC, byte-level pre-tokenizer and decoder,
    <|endoftext|> as special token 0, a run of spaces as an added (non-special) token, as Pythia has, and an added
    token made of characters of the byte-level alphabet (which the tokenizers library itself decodes wrongly)."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.add_tokens(["        ", "Ġmarkü"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_round_trip_and_exact_bytes(tokenizer_json):
    """Claim 9 (tokenizers): a Hugging Face tokenizer.json encodes and decodes every text exactly, byte for byte,
    added tokens and <|endoftext|> in the text included; the embedding's padding rows decode to nothing."""
    tok = pretrained.HFTokenizer(tokenizer_json.parent)
    assert tok.name == pretrained.tokenizer_name(tokenizer_json.parent) == str(tokenizer_json.resolve())
    assert tok.eot == 0 and tok.vocab_size == tok.tok.get_vocab_size(with_added_tokens=True)
    spaces = tok.tok.token_to_id("        ")
    for text in TEXTS + ["".join(TEXTS), "unseen: Ωμέγα ẞ \x00\x7f"]:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8"), text
        assert tok.decode(ids) == text == tok.tok.decode(ids)
        assert tok.encode(text.encode("utf-8")) == ids                 # prepare.py passes bytes
    assert spaces in tok.encode(TEXTS[2]) and tok.token_bytes(spaces) == b" " * 8
    added = tok.tok.token_to_id("Ġmarkü")
    assert tok.encode("xĠmarkü") == tok.encode("x") + [added]
    assert tok.decode(tok.encode("xĠmarkü")) == "xĠmarkü" != tok.tok.decode(tok.encode("xĠmarkü"))   # " mark\xfc"
    assert tok.token_bytes(tok.eot) == b"<|endoftext|>"
    assert tok.encode("a<|endoftext|>b") != tok.encode("a") + [tok.eot] + tok.encode("b")   # text, as in tiktoken
    assert tok.decode(tok.encode("e\u0301")) == unicodedata.normalize("NFC", "e\u0301") == "\u00e9"   # NFC
    assert tok.token_bytes(tok.vocab_size) == tok.token_bytes(50303) == b""                # padding rows
    assert pretrained.HFTokenizer(tok.name).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_tokenizer_without_the_tokenizers_package_says_how_to_get_it(tmp_path, monkeypatch):
    """Claim 9 (tokenizers): without the package, a tokenizer.json is one error that says how to install it; a
    tokenizer that is not byte-level BPE is refused."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({"decoder": {"type": "ByteLevel"}}))
    monkeypatch.setitem(sys.modules, "tokenizers", None)               # import tokenizers now fails
    with pytest.raises(RuntimeError, match="pip install tokenizers"):
        pretrained.HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"decoder": {"type": "Metaspace"}}))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        pretrained.HFTokenizer(tmp_path)


def test_prepare_and_sample_with_a_checkpoint_tokenizer(tmp_path):
    """Claim 9 (tokenizers): prepare.py --tokenizer=DIR tokenizes text with the folder's tokenizer.json, and
    sample.py --init_from=DIR samples from the folder itself, decoding with that tokenizer: each greedy token is the
    argmax of the folder's model."""
    tk = pytest.importorskip("tokenizers")
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
    meta = prep.prepare_text(src, out=tmp_path / "code", tokenizer=str(folder))
    assert meta["tokenizer"] == str((folder / "tokenizer.json").resolve()) and meta["vocab_size"] <= 300
    ids = np.fromfile(tmp_path / "code" / "train.bin", dtype=np.uint16)
    assert tok.decode(ids[:50].tolist()) == TEXT[:len(tok.decode(ids[:50].tolist()))]
    cli = REPO / "data" / f"test-tokenizer-cli-{os.getpid()}"      # the command line too (it must find pretrained.py)
    try:
        r = subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "text", str(src), f"--name={cli.name}",
                            f"--tokenizer={folder}"], cwd=tmp_path, capture_output=True, text=True, env=ENV)
        assert r.returncode == 0, r.stderr
        assert (np.fromfile(cli / "train.bin", dtype=np.uint16) == ids).all()
    finally:
        shutil.rmtree(cli, ignore_errors=True)
    out = sample.main([f"--init_from={folder}", "--start=def f", "--num_samples=1", "--max_new_tokens=6",
                       "--temperature=0"])
    config, weights = pretrained.load_neox(folder)
    model = PonderLM(PonderConfig(**config))
    model.load_state_dict(weights)
    ids = tok.encode("def f").ids
    for t in out[0]:                                   # greedy: each token is the argmax of the folder's model
        assert t == model(torch.tensor([ids]))[0][0, -1].argmax().item()
        ids.append(t)


# ================================================================================================================
# 10. Sampling: reproducible; greedy follows the exact logits; --show_thoughts; every method trains and samples;
#     odd prompts; the output streams.
# ================================================================================================================

def test_sampling_is_reproducible(trained, capsys):
    """Claim 10: the same seed gives the same text, another seed other text; a vanishing temperature is greedy (not
    nan); the speed is reported on stderr."""
    args = [f"--out_dir={trained}", "--max_new_tokens=20", "--num_samples=2", "--start=def f"]
    first = sample.main([*args, "--seed=7"])
    assert len(first) == 2 and all(len(s) == 20 for s in first)
    assert sample.main([*args, "--seed=7"]) == first
    assert sample.main([*args, "--seed=8"]) != first
    assert "tokens/s" in capsys.readouterr().err
    greedy = sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=1", "--max_new_tokens=8"])
    tiny_t = sample.main([f"--out_dir={trained}", "--temperature=1e-40", "--num_samples=1", "--max_new_tokens=8"])
    assert tiny_t == greedy


def test_greedy_sampling_follows_the_exact_logits(trained):
    """Claim 10: every token of greedy sampling is the argmax of the model's logits with exact thoughts."""
    prompt = "def "                                     # 4 + 12 tokens fit in block_size 16
    out = sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=1", "--max_new_tokens=12",
                       f"--start={prompt}"])[0]
    ckpt = saved(trained)
    model = PonderLM(PonderConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = list(prompt.encode())
    for t in out:
        logits = model(torch.tensor([ids]), jacobi="exact")[0][0, -1]
        assert logits[t] >= logits.max() - 1e-4, "greedy decoding picked a token that is not the argmax"
        ids.append(t)


def test_show_thoughts_prints_k_per_token(trained, capsys):
    """Claim 10 (--show_thoughts): K thoughts before every token, no colour codes when the output is not a terminal,
    the legend on stderr."""
    K = saved(trained)["model_config"]["n_thoughts"]
    sample.main([f"--out_dir={trained}", "--temperature=0", "--num_samples=2", "--max_new_tokens=15",
                 "--show_thoughts", "--thought_tokens=2"])
    captured = capsys.readouterr()
    assert captured.out.count("⟦") == captured.out.count("⟧") == K * 15 * 2
    assert "\033[" not in captured.out
    assert "legend" in captured.err


@pytest.mark.parametrize("trained", [1], indirect=True)
def test_sample_threads_on_cpu(trained):
    """Claim 10 (threads): on CPU a small model decodes with one thread unless --threads says otherwise, and the
    text does not depend on the thread count."""
    args = [f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=20", "--device=cpu", "--seed=3"]
    try:
        torch.set_num_threads(2)
        one = sample.main(args)
        assert torch.get_num_threads() == 1
        assert sample.main([*args, "--threads=2"]) == one and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)                        # the suite's setting


@pytest.mark.parametrize("method", BASELINES)
def test_every_method_trains_and_samples(dataset, tmp_path, method, capsys):
    """Claim 10: each baseline trains, saves its method, samples with its K steps shown, and its run cannot be
    resumed as another method."""
    train_run(dataset, tmp_path, f"--method={method}", "--n_thoughts=2", "--max_iters=3", "--eval_interval=3")
    assert saved(tmp_path)["method"] == method
    out = sample.main([f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=30", "--show_thoughts",
                       "--temperature=0"])
    assert len(out[0]) == 30
    assert capsys.readouterr().out.count("⟦") == 2 * 30
    with pytest.raises(train.Fail, match=f"is a {method} model|has method={method}"):
        train_run(dataset, tmp_path, "--method=ponderlm2", "--max_iters=4")


def test_odd_prompts(trained, tmp_path, capsys):
    """Claim 10 (prompts): a prompt file that is not UTF-8 and longer than block_size is kept to its last block_size
    tokens (with a note) and sampled from; invalid bytes in the argument are sampled from too."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xff\xfe broken utf-8 " + b"x = 1\n" * 10)      # longer than block_size 16
    out = sample.main([f"--out_dir={trained}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=40"])
    assert len(out[0]) == 40
    assert "keeping its last 16" in capsys.readouterr().err
    broken = b"x = \xff\xfe".decode("utf-8", errors="surrogateescape")      # how argv delivers invalid bytes
    assert len(sample.main([f"--out_dir={trained}", f"--start={broken}", "--num_samples=1", "--max_new_tokens=5"])[0]) == 5


def default_sigint():
    """A shell starts background jobs with SIGINT ignored, and Python then never turns it into KeyboardInterrupt:
    give the child the terminal's default, whatever the test runner got."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("trained", [1], indirect=True)
def test_sample_output_streams(trained):
    """Claim 10 (output streams): `| head` ends quietly; > /dev/full and >&- are one line on stderr; with 2>&- the
    notes never land in the text; Ctrl-C stops with one word."""
    args = [sys.executable, "sample.py", f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=5"]
    cmd = f"{sys.executable} sample.py --out_dir={trained} --num_samples=50 --max_new_tokens=200 | head -c 20"
    r = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, timeout=120, env=ENV)
    assert len(r.stdout) == 20 and b"Error" not in r.stderr and b"Traceback" not in r.stderr, r.stderr
    with open("/dev/full", "w") as full:
        r = subprocess.run(args, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, env=ENV)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: cannot write the output")
    assert "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and "standard output is closed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV,
                       preexec_fn=lambda: os.close(2))
    assert r.returncode == 0 and "sample 1/1" not in r.stdout and "tokens/s" not in r.stdout, r.stdout
    p = subprocess.Popen([*args[:-2], "--num_samples=1000", "--max_new_tokens=20"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=default_sigint)
    try:
        for line in p.stderr:
            if "sample 2/" in line:
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err.strip() == "interrupted", err
    finally:
        stop(p)


# ================================================================================================================
# 11. Nothing lost: stop signals (SIGTERM, SIGHUP, Ctrl-C, signals under torchrun), the lock, concurrent saves, a
#     full disk, a failed log rewrite, a damaged log, divergence, starting over, stale temporaries, a failed fresh
#     start, a full stdout.
# ================================================================================================================

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_finishes_the_step_and_saves(dataset, tmp_path, sig):
    """Claim 11 (stops): SIGTERM, or SIGHUP (a closed terminal), lets the step finish, then the run evaluates, saves
    that step's checkpoint and log entry, and exits cleanly."""
    p = subprocess.Popen(train_command(dataset, tmp_path, "--max_iters=100000", "--eval_interval=100000"), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(p, "step 3/")
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        stop(p)
    assert p.returncode == 0 and err == "", err
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert saved(tmp_path)["step"] == step
    assert log_entries(tmp_path)[-1]["step"] == step


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-one-rank", "sigterm-to-the-whole-job"])
def test_a_signal_under_torchrun_stops_every_rank_at_one_step(dataset, tmp_path, how):
    """Claim 11 (stops under torchrun): Ctrl-C in a terminal reaches torchrun's process group; torchrun passes it on
    to each worker. A scheduler may signal a single worker: the other must stop at the same step. Or it signals every
    process of the job: each worker then gets SIGTERM twice (directly, then through torchrun), which is one request,
    not two. The final evaluation is made long, so that the second copy arrives while there is still work to do."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *train_command(dataset, tmp_path, "--max_iters=100000", "--eval_interval=100000",
                                         "--eval_windows=4000")[1:]], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=ENV)
    try:
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
    finally:
        stop(p)
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert saved(tmp_path)["step"] == step
    assert 'train.py", line' not in err and "interrupted" not in err, err[-2000:]   # torchrun may print its own


def test_a_second_run_in_the_same_folder_is_refused(dataset, tmp_path):
    """Claim 11 (the lock): a second run aimed at a folder in use is refused and names the owner's pid; once the
    owner is done, or killed by kill -9, the folder can be used again."""
    holder = common.RunDir(tmp_path)
    holder.claim()
    with pytest.raises(train.Fail, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        train_run(dataset, tmp_path, "--max_iters=1")
    holder.release()
    train_run(dataset, tmp_path, "--max_iters=1")
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, common; r = common.RunDir(sys.argv[1]); r.claim(); "
                          "print('held', flush=True); time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        assert p.stdout.readline() == "held\n"
    finally:
        p.kill()
        p.wait()
    train_run(dataset, tmp_path, "--max_iters=2")


def test_a_folder_without_locks_warns_and_a_failed_start_leaves_nothing(dataset, tmp_path, monkeypatch, capsys):
    """Claim 11 (the lock): where the file system has no locks, the run warns and trains; a run that fails before
    its first step removes the folder it made."""
    def no_locks(f):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(common, "lock_file", no_locks)
    train_run(dataset, tmp_path / "nfs", "--max_iters=1")
    assert "warning: cannot lock" in capsys.readouterr().out and (tmp_path / "nfs" / "ckpt.pt").exists()
    monkeypatch.undo()
    with pytest.raises(train.Fail, match="not found"):
        train_run(str(tmp_path / "no_data"), tmp_path / "new", "--max_iters=1")
    assert not (tmp_path / "new").exists()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_concurrent_saves_never_collide(tmp_path):
    """Claim 11 (concurrent saves): two threads saving to one path leave one whole checkpoint of one of them, with
    the umask's mode, and no temporary file."""
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
    assert not errors and files(tmp_path) == ["ckpt.pt"]
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"].unique().numel() == 1


@pytest.mark.parametrize("how", ["torch.save fails", "file size limit at 10%", "file size limit at 50%"])
def test_a_failed_save_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch, capsys, how):
    """Claim 11 (a full disk): when a checkpoint cannot be written the run stops with one line, and the previous
    checkpoint, the log and nothing else remain. Simulated (torch.save writes part of a file, then fails), or for
    real: a file-size limit makes writes fail as a full disk does, and where the write fails decides what torch.save
    raises (a RuntimeError inside it, an OSError at the flush), hence two limits."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    if how == "torch.save fails":
        def full(obj, f):
            f.write(b"part of a checkpoint")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", full)
        capsys.readouterr()
        with pytest.raises(train.Fail, match="No space left on device.*ckpt.pt still holds step 2") as e:
            train_run(dataset, tmp_path, "--max_iters=4", "--eval_interval=2")
        assert "\n" not in str(e.value) and "saved" not in capsys.readouterr().out
        monkeypatch.undo()
    else:
        size = int((tmp_path / "ckpt.pt").stat().st_size * float(how.split()[-1][:-1]) / 100)
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))    # noqa: E731
        r = subprocess.run(train_command(dataset, tmp_path, "--max_iters=4", "--eval_interval=2"), cwd=REPO,
                           capture_output=True, text=True, preexec_fn=limit, env=ENV)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "ckpt.pt still holds step 2" in r.stderr and "saved" not in r.stdout
    assert saved(tmp_path)["step"] == 2
    assert files(tmp_path) == ["ckpt.pt", "lock", "log.jsonl"]


def test_a_failed_log_rewrite_keeps_the_log(dataset, tmp_path, monkeypatch):
    """Claim 11 (the log): when the log cannot be rewritten on resume (a full disk), it stays as it was, and the
    error is one line."""
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
    assert files(tmp_path) == ["ckpt.pt", "lock", "log.jsonl"]


def test_a_damaged_log_is_repaired_on_resume(dataset, tmp_path):
    """Claim 11 (the log): lines that are not UTF-8, not JSON objects with a step, cut short, or of steps the
    checkpoint does not have are dropped on resume."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1, 2]\n"text"\n{"step": "x"}\n{"no_step": 1}\n{"step": 9, "loss": 1}\n{"ste')
    train_run(dataset, tmp_path, "--max_iters=3")
    assert [e["step"] for e in log_entries(tmp_path) if "loss" in e] == [1, 2, 3]


def test_a_diverging_run_stops_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    """Claim 11 (divergence): a non-finite loss stops the run with one line that names the last good checkpoint,
    which stays as it was, or says that none was saved."""
    train_run(dataset, tmp_path / "kept", "--max_iters=2", "--eval_interval=2")
    forward = PonderLM.forward
    monkeypatch.setattr(PonderLM, "forward", lambda self, *a, **kw: (lambda logits, loss: (logits, loss * float("nan")))(
        *forward(self, *a, **kw)))
    with pytest.raises(train.Fail, match="diverged; the last good checkpoint stays in .*kept.ckpt.pt"):
        train_run(dataset, tmp_path / "kept", "--max_iters=4")
    ckpt = saved(tmp_path / "kept")
    assert ckpt["step"] == 2 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    with pytest.raises(train.Fail, match="diverged; no checkpoint was saved"):
        train_run(dataset, tmp_path / "none", "--max_iters=2")


def test_starting_over_keeps_the_previous_run(dataset, tmp_path):
    """Claim 11 (starting over): --init_from=scratch where a run exists moves its checkpoint and log to
    previous-<time>/, unchanged."""
    train_run(dataset, tmp_path, "--max_iters=1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    train_run(dataset, tmp_path, "--max_iters=1", "--init_from=scratch", "--seed=5")
    (old,) = tmp_path.glob("previous-*")
    assert (old / "ckpt.pt").read_bytes() == before and (old / "log.jsonl").exists()


def test_a_failed_fresh_start_moves_nothing(dataset, tmp_path):
    """Claim 11 (starting over): --init_from=scratch with an option the dataset cannot serve fails before the old
    run is set aside, so the next plain command resumes it."""
    train_run(dataset, tmp_path, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(train.Fail, match="fewer than block_size"):
        train_run(dataset, tmp_path, "--init_from=scratch", "--block_size=100000")
    assert files(tmp_path) == ["ckpt.pt", "lock", "log.jsonl"]
    train_run(dataset, tmp_path, "--max_iters=3")
    assert saved(tmp_path)["step"] == 3


def test_stale_temporaries_of_dead_processes_are_removed(dataset, tmp_path):
    """Claim 11 (stale temporaries): kill -9 during a save leaves ckpt.pt.<pid>-<hex>.tmp; the next run in the folder
    removes those of dead processes, and never one of a live process."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ckpt.pt.{int(dead.stdout)}-0a1b2c3d.tmp"
    live = tmp_path / f"ckpt.pt.{os.getpid()}-0a1b2c3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    train_run(dataset, tmp_path, "--max_iters=1")
    assert not stale.exists() and live.exists()


def test_training_goes_on_when_stdout_is_full(dataset, tmp_path):
    """Claim 11 (stdout full): train.py > /dev/full warns once on stderr, and the run trains and saves; its
    log.jsonl has every line."""
    with open("/dev/full", "w") as full:
        r = subprocess.run(train_command(dataset, tmp_path, "--max_iters=2", "--eval_interval=2"), cwd=REPO,
                           stdout=full, stderr=subprocess.PIPE, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "standard output" in r.stderr, r.stderr
    assert saved(tmp_path)["step"] == 2 and [e["step"] for e in log_entries(tmp_path)] == [0, 1, 2, 2]


@pytest.mark.parametrize("driver", ["state_tracking", "retrofit"])
def test_a_report_with_nothing_to_report_keeps_the_committed_one(driver, tmp_path, monkeypatch, capsys):
    """Claim 11 (the experiments' reports): asked for a report before any run has finished (a fresh clone), a
    driver refuses in one line and leaves its report in assets/ as it is. (Run on a copy of the reports.)"""
    import retrofit
    module = {"state_tracking": state_tracking, "retrofit": retrofit}[driver]
    (tmp_path / "assets").mkdir()
    for f in (REPO / "assets").glob(f"{driver}.*"):
        if f.suffix != ".py":
            shutil.copy(f, tmp_path / "assets")
    before = {f: f.read_bytes() for f in (tmp_path / "assets").iterdir()}
    monkeypatch.setattr(module, "REPO", tmp_path)
    monkeypatch.setattr(module, "OUT", tmp_path / "study" / driver)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        module.main(["--report_only" if driver == "state_tracking" else "--report"])
    assert "first" in capsys.readouterr().err.splitlines()[-1]
    assert len(before) == 3 and all(f.read_bytes() == b for f, b in before.items())


# ================================================================================================================
# 12. Bad input gives one line, before any work where it can: options, checkpoints, out_dir, RANK without torchrun,
#     out of memory, sample.py's refusals, eval_windows.
# ================================================================================================================

def test_the_model_refuses_bad_arguments():
    """Claim 12 (the model): a sequence longer than block_size, targets of another shape or a negative J are
    ValueErrors that say so."""
    model = tiny(1)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens(T=9))
    with pytest.raises(ValueError, match="targets have shape"):
        model(tokens(), tokens()[:, :-1])
    with pytest.raises(ValueError, match="jacobi"):
        model(tokens(), jacobi=-1)


BAD_OPTIONS = [  # train.py's command line, and what its one-line error must say
    (["--beta1=2"], "--beta1 must be within"), (["--beta2=nan"], "--beta2: expected a finite number"),
    (["--beta2=1"], "--beta2 must be within"), (["--seed=-1"], "--seed must be within"),
    (["--seed=18446744073709551616"], "--seed must be within"), (["--grad_clip=nan"], "--grad_clip: expected a finite"),
    (["--lr=inf"], "--lr: expected a finite number"), (["--weight_decay=nan"], "--weight_decay: expected a finite"),
    (["--max_iters=ten"], "--max_iters: expected int"), (["--min_lr_ratio=2"], "--min_lr_ratio (must be )?within"),
    (["--rope_theta=0"], "rope_theta must be a positive number"), (["--norm_eps=-1"], "norm_eps must be a positive"),
    (["--n_thoughts=-1"], "n_thoughts must be >= 0"), (["--jacobi_min=-1"], "jacobi_min must be >= 0"),
    (["--jacobi_eval=-2"], "jacobi_eval must be >= 0"),
    (["--jacobi_min=3", "--jacobi_max=2"], r"jacobi_min \(3\) must not exceed jacobi_max \(2\)"),
    (["--n_embd=30", "--n_head=4"], r"n_embd \(30\) must split into n_head \(4\)"),
    (["--method=pondr"], "--method=pondr: use ponderlm2, pause, loop, ponderlm"),
    (["--compile=maybe"], "--compile=maybe: use auto, true, false"), (["--emb_scale=2"], "emb_scale must be auto"),
    (["--method=loop", "--jacobi_min=1"], "--jacobi_min belongs to PonderLM-2's thought solve"),
    (["--learning_rate=1e-3"], "unknown option --learning_rate; did you mean --lr?"),
    (["--n_layers=3"], "did you mean --n_layer"), (["--init_from=maybe"], "--init_from=maybe: no checkpoint there"),
    (["--init_from=resume"], "no checkpoint at .*ckpt.pt to resume"),
    (["--dataset=no_such_dataset"], "dataset 'no_such_dataset' not found"),
    (["--block_size=4096"], "fewer than block_size 4096"), (["--batch_tokens=100"], "--batch_tokens=100 is not a multiple"),
    (["--rotary_pct=0.01"], "rotary_pct \\(0.01\\) must turn an even number"),   # 0 of a head's 16 dimensions
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(argv) for argv, _ in BAD_OPTIONS])
def test_bad_options_fail_in_one_line_before_any_work(dataset, tmp_path, capsys, argv, message):
    """Claim 12 (options): a bad option, value or combination, or one the dataset cannot serve, is one line that
    names it, and out_dir is never made."""
    out = tmp_path / "never_made"
    error = one_line_error(train.main, [f"--dataset={dataset}", f"--out_dir={out}", *TINY, *argv], capsys)
    assert re.search(message, error), error
    assert not out.exists()


def test_train_py_errors_are_one_line_on_stderr(tmp_path):
    """Claim 12: run as a script, train.py prints a refusal as one line on stderr and exits with 1."""
    r = subprocess.run([sys.executable, "train.py", "--dataset=missing_dataset", f"--out_dir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: dataset 'missing_dataset'"), r.stderr


@pytest.mark.parametrize("argv, value", [([], "auto"), (["--compile"], "true"), (["--compile=True"], "true"),
                                         (["--compile=OFF"], "false"), (["--compile=0"], "false")])
def test_compile_takes_the_words_a_bool_option_takes(argv, value):
    """Claim 12 (options): --compile, which also takes auto, accepts what a bool option accepts: a bare flag, True,
    off, 0 (anything else is refused in one line, above)."""
    cfg, given = common.parse_options(train.TrainConfig, argv, "train")
    cfg.check(given)
    assert cfg.compile == value


@pytest.mark.parametrize("trained", [1], indirect=True)
def test_a_checkpoint_that_does_not_fit_the_options_or_the_data(trained, dataset, tmp_path):
    """Claim 12 (checkpoints): resuming with another shape, or on a dataset of another vocabulary, is one line."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with pytest.raises(train.Fail, match="n_layer=2, not 3"):
        train_run(dataset, run, "--n_layer=3", "--max_iters=6")
    gpt2 = tmp_path / "gpt2data"
    gpt2.mkdir()
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(gpt2 / f"{split}.bin")
    (gpt2 / "meta.json").write_text(json.dumps(dict(tokenizer="gpt2", vocab_size=50257, train_tokens=1000,
                                                    val_tokens=1000)))
    with pytest.raises(train.Fail, match="vocabulary of 256"):
        train_run(str(gpt2), run, "--max_iters=6")
    assert files(run) == files(trained)


def not_a_checkpoint(path, ckpt):
    path.write_bytes(b"\x00not a checkpoint")


def without_model_config(path, ckpt):
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, path)


def with_a_tensor_of_another_shape(path, ckpt):
    ckpt["model"]["wte.weight"] = ckpt["model"]["wte.weight"][:10]
    torch.save(ckpt, path)


DAMAGED_CHECKPOINTS = {  # a damage, and what train.py and sample.py then say
    "not a checkpoint": (not_a_checkpoint, "not a readable checkpoint", "not a readable checkpoint"),
    "no model_config": (without_model_config, "not a checkpoint of train.py .*'model_config'",
                        "not a checkpoint of train.py .*'model_config'"),
    "another shape": (with_a_tensor_of_another_shape, "the weights in .* do not fit a ponderlm2 model",
                      "does not match the model it describes"),
}


@pytest.mark.parametrize("script", ["train", "sample"])
@pytest.mark.parametrize("damage", DAMAGED_CHECKPOINTS)
@pytest.mark.parametrize("trained", [1], indirect=True)
def test_a_damaged_checkpoint_is_one_line(trained, dataset, tmp_path, damage, script):
    """Claim 12 (checkpoints): a checkpoint that is no checkpoint, lacks its model config, or holds tensors that do
    not fit its model is one line, from train.py and from sample.py."""
    change, *messages = DAMAGED_CHECKPOINTS[damage]
    (tmp_path / "run").mkdir()
    change(tmp_path / "run" / "ckpt.pt", saved(trained))
    if script == "train":
        with pytest.raises(train.Fail, match=messages[0]) as e:
            train_run(dataset, tmp_path / "run", "--max_iters=6")
    else:
        with pytest.raises(common.Fail, match=messages[1]) as e:
            sample.main([f"--out_dir={tmp_path / 'run'}"])
    assert "\n" not in str(e.value)


def test_eval_only_needs_no_optimizer_state_but_resuming_does(dataset, tmp_path):
    """Claim 12 (checkpoints): a checkpoint without optimizer state can be evaluated with --eval_only; resuming it
    is one line that says so."""
    train_run(dataset, tmp_path, "--max_iters=1")
    ckpt = saved(tmp_path)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    val = train_run(dataset, tmp_path, "--eval_only")
    assert math.isfinite(val["val_loss"])
    with pytest.raises(train.Fail, match="no optimizer state to continue from"):
        train_run(dataset, tmp_path, "--max_iters=2")


@pytest.mark.parametrize("case", ["a file", "read-only", "empty", "log.jsonl a folder"])
def test_an_unusable_out_dir_is_one_line(dataset, tmp_path, monkeypatch, case):
    """Claim 12 (out_dir): a file, a read-only place, an empty name (an unset shell variable?) or a folder where the
    log goes is one line that says what to do; an empty name makes nothing."""
    monkeypatch.chdir(tmp_path)
    if case == "a file":
        (tmp_path / "a_file").write_text("x")
        out, message = tmp_path / "a_file", "cannot use --out_dir=.*a_file"
    elif case == "read-only":
        def read_only(self, *a, **kw):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(Path, "mkdir", read_only)
        out, message = tmp_path / "ro", "Read-only file system; choose a writable folder"
    elif case == "empty":
        out, message = "", "--out_dir is empty"
    else:
        (tmp_path / "run" / "log.jsonl").mkdir(parents=True)
        out, message = tmp_path / "run", "log.jsonl is not a file"
    with pytest.raises(train.Fail, match=message) as e:
        train_run(dataset, out, "--max_iters=1")
    assert "\n" not in str(e.value)
    if case == "empty":
        assert list(tmp_path.iterdir()) == []


def test_rank_without_torchrun_is_one_line(dataset, tmp_path, monkeypatch):
    """Claim 12: RANK set without torchrun's other variables is one line that says how to start ranks."""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(train.Fail, match="RANK is set, but not LOCAL_RANK.*torchrun"):
        train_run(dataset, tmp_path, "--max_iters=1")


@pytest.mark.parametrize("memory", ["GPU", "CPU"])
def test_out_of_memory_is_one_line(dataset, tmp_path, monkeypatch, memory):
    """Claim 12 (out of memory): running out of GPU memory (simulated: the CPU has none) or of CPU memory (the
    allocator's RuntimeError) is one line that says what to lower, and names the checkpoint it keeps if there is
    one."""
    train_run(dataset, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    if memory == "GPU":
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    else:
        error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                             "tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    def oom(*a, **k):
        raise error

    monkeypatch.setattr(train, "get_batch", oom)
    where = "GPU " if memory == "GPU" else ""
    with pytest.raises(train.Fail, match=f"^out of {where}memory at --micro_batch=4: use a smaller one.*ckpt.pt is "
                                         "kept$"):
        train_run(dataset, tmp_path / "run", "--max_iters=4", "--eval_interval=2")
    assert saved(tmp_path / "run")["step"] == 2
    with pytest.raises(train.Fail, match=f"^out of {where}memory at .*or a smaller model$"):   # none to name
        train_run(dataset, tmp_path / "new", "--max_iters=4", "--eval_interval=2")


BAD_SAMPLE_OPTIONS = [  # sample.py's command line (after --out_dir of a run), and what its one-line error must say
    (["--temperature=-1"], "--temperature must be >= 0"), (["--temperature=nan"], "expected a finite number"),
    (["--top_k=0"], "--top_k, --num_samples, --max_new_tokens and --thought_tokens must be at least 1"),
    (["--seed=-5"], "--seed must be within"), (["--seed=18446744073709551616"], "--seed must be within"),
    (["--start=FILE:"], "needs a file name after the colon"), (["--start=FILE:no_such_file"], "cannot read the prompt"),
    (["--start="], "the prompt is empty"), (["--prefill=approximate"], "--prefill=approximate: use exact or jacobi"),
    (["--show_thoughts", "--thought_tokens=1000"], "more than the vocabulary"),
    (["--init_from=no_such_run"], "no checkpoint at no_such_run: train one with `python train.py`"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLE_OPTIONS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_OPTIONS])
@pytest.mark.parametrize("trained", [1], indirect=True)
def test_sample_refuses_bad_input_in_one_line(trained, capsys, argv, message):
    """Claim 12 (sample.py's refusals): a bad option, prompt or checkpoint path is one line that names it."""
    error = one_line_error(sample.main, [f"--out_dir={trained}", *argv], capsys)
    assert re.search(message, error), error


def test_eval_windows_beyond_the_split(tmp_path, capsys):
    """Claim 12 (eval_windows): more evaluation windows than the val split holds repeat some, with a note; far more
    are refused in one line. (A val split of 40 tokens holds 24 windows of 16.)"""
    data = hf_dataset(tmp_path / "small", "bytes", 256, n=40)
    with pytest.raises(train.Fail, match="^--eval_windows=2000000000 but the val split holds 24 windows"):
        train_run(str(data), tmp_path / "a", "--eval_windows=2e9", "--max_iters=1")
    train_run(str(data), tmp_path / "b", "--eval_windows=25", "--max_iters=1")
    assert "note: the val split holds 24 windows of block_size 16; --eval_windows=25 repeats some" in \
        capsys.readouterr().out


# ================================================================================================================
# 13. The state-tracking task: group elements and products against brute force, words and datasets deterministic
#     and in the per-token-targets format, train.py trains on them, and the evaluation's accuracies on a model whose
#     answers are known.
# ================================================================================================================

def permutation_matrix(p):
    """M[i, p[i]] = 1, so that permutation_matrix(a) @ permutation_matrix(b) is "a, then b"."""
    m = np.zeros((len(p), len(p)), dtype=np.int64)
    m[np.arange(len(p)), list(p)] = 1
    return m


def states_by_brute_force(g, word):
    """The prefix products of one word, without the group's table: products of permutation matrices (plain sums for
    Z<n>), each named by searching the list of elements."""
    if g.name.startswith("Z"):
        return [sum(word[:t + 1]) % g.order for t in range(len(word))]
    mats = [permutation_matrix(p) for p in g.elements]
    out, m = [], np.eye(len(g.elements[0]), dtype=np.int64)
    for a in word:
        m = m @ mats[a]
        out.append(next(k for k, q in enumerate(mats) if (q == m).all()))
    return out


@pytest.mark.parametrize("name, order", [("S3", 6), ("A4", 12), ("A5", 60), ("S5", 120), ("Z60", 60)])
def test_group_elements_and_words_against_brute_force(name, order):
    """Claim 13 (groups): S<n> holds every permutation and A<n> the even ones, in lexicographic order, with the
    identity first; the state after each letter equals a product of permutation matrices (sums mod n for Z<n>)."""
    g = groups.group(name)
    assert g.order == order and g.table.shape == (order, order) and g.identity == 0
    if name[0] in "SA":
        n = int(name[1:])
        perms = list(itertools.permutations(range(n)))
        if name[0] == "A":                            # even: an even number of inversions
            perms = [p for p in perms if sum(p[i] > p[j] for i, j in itertools.combinations(range(n), 2)) % 2 == 0]
        assert [tuple(p) for p in g.elements] == perms
    x = groups.words(g, 20, 12, seed=3, stream=0)
    s = groups.prefix_products(g, x)
    assert [list(row) for row in s] == [states_by_brute_force(g, w.tolist()) for w in x]


def test_group_product_is_a_then_b():
    """Claim 13 (groups): a*b means "a, then b", checked on S3 by hand, and S3 is not abelian."""
    g = groups.group("S3")
    swap01, cycle = g.elements.index((1, 0, 2)), g.elements.index((1, 2, 0))
    assert g.elements[g.table[swap01, cycle]] == (2, 1, 0)         # 0 -> 1 -> 2, 1 -> 0 -> 1, 2 -> 2 -> 0
    assert g.elements[g.table[cycle, swap01]] == (0, 2, 1)
    assert groups.prefix_products(g, np.array([[swap01, cycle]]))[0].tolist() == [swap01, g.table[swap01, cycle]]


def test_group_words_are_deterministic(monkeypatch):
    """Claim 13 (groups): words depend on the seed and stream only (not on the chunk size they are written in); the
    letters are distinct, drawn from the seed, and their quotients generate the group."""
    g = groups.group("A5")
    a = groups.words(g, 100, 16, seed=7, stream=0)
    monkeypatch.setattr(groups, "CHUNK", 7)
    assert (a == groups.words(g, 100, 16, seed=7, stream=0)).all()
    assert (a != groups.words(g, 100, 16, seed=7, stream=1)).mean() > 0.9
    assert (a != groups.words(g, 100, 16, seed=8, stream=0)).mean() > 0.9
    letters = groups.pick_letters(g, 4, seed=7)
    assert (letters == groups.pick_letters(g, 4, seed=7)).all() and len(set(letters.tolist())) == 4
    assert set(np.unique(groups.words(g, 200, 16, seed=7, stream=0, letters=letters))) == set(letters.tolist())
    quotients = {int(g.table[a, groups.inverse(g, b)]) for a in letters for b in letters}
    assert len(groups.closure(g, quotients)) == 60


def test_group_dataset_is_a_targets_dataset(tmp_path):
    """Claim 13 (groups): a prepared dataset holds the words and their states (int32 targets), align = the word
    length, val from another stream than train; train.py's dataset check accepts it, one window per word."""
    out = tmp_path / "s3"
    meta = groups.prepare("S3", 8, 300, 50, seed=5, out=out)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["align"], meta["targets"]) == ("ids", 6, 8, True)
    g = groups.group("S3")
    for split, n, stream in [("train", 300, 0), ("val", 50, 1)]:
        x = np.fromfile(out / f"{split}.bin", dtype=np.uint16).reshape(n, 8)
        y = np.fromfile(out / f"{split}_targets.bin", dtype=np.int32).reshape(n, 8)
        assert (x == groups.words(g, n, 8, seed=5, stream=stream)).all()
        assert [list(r) for r in y] == [states_by_brute_force(g, w.tolist()) for w in x]
    loaded = common.load_dataset(str(out), 8, True)
    assert common.windows(loaded, "train", 8) == 300 and common.windows(loaded, "val", 8) == 50
    with pytest.raises(ValueError, match="already holds a dataset"):
        groups.prepare("S3", 8, 300, 50, seed=5, out=out)


@pytest.mark.parametrize("args, message", [(["Q8"], "unknown group"), (["S5", "--length=0"], "--length must be"),
                                           (["S9"], "at most 5040"), (["A5", "--letters=1"], "--letters must be"),
                                           (["S3", "--name=../x"], "plain folder name")])
def test_group_cli_bad_input(args, message):
    """Claim 13 (groups) and 12: data/groups.py refuses bad arguments in one line."""
    p = subprocess.run([sys.executable, "data/groups.py", *args], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


class KnownAnswers(torch.nn.Module):
    """A stand-in model whose answers are known: with J Jacobi passes it names the true state (computed by brute
    force) at the first J + 1 positions and a wrong one after them; with exact thoughts at every position. Like a
    model without absolute positions, it is also wrong at the second position of a word that starts a, a."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, idx, jacobi=None):
        T = idx.shape[1]
        right = T if jacobi == "exact" else min(jacobi + 1, T)
        states = torch.tensor([states_by_brute_force(self.g, w) for w in idx.tolist()])
        states[:, right:] = (states[:, right:] + 1) % self.g.order
        repeated = idx[:, 0] == idx[:, 1]
        states[repeated, 1] = (states[repeated, 1] + 1) % self.g.order
        return F.one_hot(states, self.g.order).float() * 3, None


def test_state_tracking_evaluation_on_known_answers():
    """Claim 13 (evaluation): on a model whose answers are known, the accuracy by position (all words, and words whose
    first two letters differ), the accuracy against J and the passes to exact thoughts come out as they must, and
    predictions do not depend on the batch size."""
    g = groups.group("S3")
    x = groups.words(g, 30, 16, seed=2, stream=5)
    x[:, 1] = (x[:, 0] + 1) % 6                                 # no word starts a, a ...
    x[:3, 1] = x[:3, 0]                                         # ... but three
    y = groups.prefix_products(g, x)
    model = KnownAnswers(g)
    res = state_tracking.measure(model, x, y, [3, "exact"], sweep=[*range(16), "exact"])
    assert res["accuracy_distinct_start"][3] == [1.0] * 4 + [0.0] * 12
    assert res["accuracy"][3] == [1.0, 0.9, 1.0, 1.0] + [0.0] * 12
    assert res["accuracy_distinct_start"]["exact"] == [1.0] * 16
    assert [round(sum(res["sweep"][str(J)]), 6) for J in range(16)] == [J + 1 - 0.1 * (J > 0) for J in range(16)]
    assert res["passes_to_exact"] == 15 and res["logit_gap"]["exact"] == 0 < res["logit_gap"]["14"]
    whole, _ = state_tracking.predictions(model, x, 2)
    assert (state_tracking.predictions(model, x, 2, batch=7)[0] == whole).all()
    assert state_tracking.horizon([1.0, 0.95, 0.5, 0.99]) == 2 and state_tracking.horizon([1.0, 1.0]) == 2


def test_state_tracking_trains_and_evaluates_a_tiny_run(tmp_path):
    """Claim 13 (evaluation): train.py trains on a group dataset (K = 1, 3 steps), and the study's evaluation reads
    the run back with a longer block_size and gives predictions at J = 3 and with exact thoughts."""
    data = tmp_path / "s3_8"
    groups.prepare("S3", 8, 200, 20, seed=0, out=data)
    out = tmp_path / "run"
    train_run(str(data), out, "--block_size=8", "--n_thoughts=1", "--max_iters=3", "--eval_interval=3",
              "--eval_windows=4", "--micro_batch=4", "--batch_tokens=32")
    assert saved(out)["step"] == 3
    model, _ = state_tracking.load_model(out, 16)
    x = groups.words(groups.group("S3"), 5, 16, seed=1, stream=16)
    for jacobi in (3, "exact"):
        pred, logits = state_tracking.predictions(model, x, jacobi, batch=2)
        assert pred.shape == (5, 16) and logits.shape == (5, 16, saved(out)["model_config"]["vocab_size"])


# ================================================================================================================
# The repository: CI runs the README's test command; the documentation's relative links resolve.
# ================================================================================================================

def test_ci_runs_the_readme_test_command():
    """Repository: .ci/run ends with the test command README.md gives."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = "python -m pytest -q"
    assert f"\n{command}\n" in readme and ci.rstrip().endswith(command)


def markdown_text(path):
    """A Markdown file without its HTML comments and fenced code blocks, where nothing is a link or a heading."""
    text = re.sub(r"<!--.*?-->", "", path.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def github_anchors(path):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation other than - and _ dropped,
    spaces made hyphens, and -1, -2, ... added to repeats."""
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?)(?: +#+)? *$", markdown_text(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_the_docs_resolves():
    """Repository: every relative link in README.md and docs/*.md (web links and HTML comments aside) names a file
    in the repository, and its #anchor, if any, a heading of that file."""
    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"`[^`\n]*`", "", markdown_text(doc))            # inline code holds no links either
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
            if re.match(r"[a-zA-Z][\w+.-]*:", target):          # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.is_file() or REPO not in file.parents:
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in github_anchors(file):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
