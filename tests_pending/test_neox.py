"""Tests for GPT-NeoX in ponder (arch="neox") and for pretrained.py: the neox model against an independent reference,
its cached decoding, a Hugging Face GPT-NeoX checkpoint folder loaded into it, the loader's refusals, and the
checkpoint's tokenizer. CPU, offline, a few seconds in all. Written to be merged into test_ponder.py: its helpers
are prefixed (neox_, hf_) so that they do not collide with the Llama ones there.

Run with `python -m pytest -q tests_pending/test_neox.py` from the repository root.
"""

import json
import math
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # not needed once merged into test_ponder.py

import pretrained  # noqa: E402
from ponder import PonderConfig, PonderLM  # noqa: E402


def tiny_neox(n_thoughts, seed=0, **kw):
    """A float64 neox model with 4 of each head's 8 dimensions rotated. Its biases and norm gains are drawn at
    random too: they start at 0 and 1, where a dropped bias or gain would not show."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, n_thoughts=n_thoughts, arch="neox",
               rotary_pct=0.5)
    model = PonderLM(PonderConfig(**{**cfg, **kw})).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def neox_tokens(B=2, T=8, vocab=32, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- an independent GPT-NeoX: written from the architecture's definition, sharing no code with ponder.py
# (LayerNorm and GELU by hand, explicit softmax attention, rotary by complex multiplication) ----------------------

def ref_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_causal_attention(q, k, v):
    """q, k, v: (B, S, nh, hs); softmax(q k^T / sqrt(hs) + causal mask) v, heads merged: (B, S, nh * hs)."""
    S, hs = q.size(1), q.size(-1)
    mask = torch.full((S, S), float("-inf"), dtype=q.dtype).triu(1)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs) + mask
    return torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).flatten(2)


def ref_turns(r, pos, theta):
    """The rotary turn of each position, as complex numbers (S, r/2): angle pos * theta^(-2i/r). Rounded through
    float32, as the model keeps its tables (and Hugging Face computes its own)."""
    angles = torch.tensor(pos, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, r, 2).double() / r)
    return torch.complex(angles.cos().float().double(), angles.sin().float().double())


def ref_neox_run(model, x, pos):
    """GPT-NeoX blocks and the final LayerNorm, over slot inputs x (B, S, d) at rotary positions pos (S ints),
    causal over the S slots in order: each block is x + attn(ln1(x)) + mlp(ln2(x)), both branches reading the same
    x; rotary turns the first r = rotary_pct * hs dimensions of each head, the pairs (i, i + r/2)."""
    c = model.config
    d, nh, eps = c.n_embd, c.n_head, c.norm_eps
    hs = d // nh
    r = int(hs * c.rotary_pct)
    turn = ref_turns(r, pos, c.rope_theta)[:, None]          # (S, 1, r/2)

    def rope(t):                                             # t: (B, S, nh, hs)
        z = torch.complex(t[..., :r // 2], t[..., r // 2:r]) * turn
        return torch.cat([z.real, z.imag, t[..., r:]], dim=-1)

    for blk in model.blocks:
        a = ref_layer_norm(x, blk.norm1.weight, blk.norm1.bias, eps)
        q, k, v = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(d, dim=-1)   # ponder's [q; k; v]
        q, k, v = (t.reshape(*t.shape[:2], nh, hs) for t in (q, k, v))
        attn = ref_causal_attention(rope(q), rope(k), v) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        m = ref_layer_norm(x, blk.norm2.weight, blk.norm2.bias, eps)
        mlp = ref_gelu(m @ blk.mlp.up.weight.T + blk.mlp.up.bias) @ blk.mlp.down.weight.T + blk.mlp.down.bias
        x = x + attn + mlp
    return ref_layer_norm(x, model.norm_f.weight, model.norm_f.bias, eps)


def ref_neox_ponderlm2(model, idx):
    """PonderLM-2 on GPT-NeoX, token by token with no cache and no Jacobi iteration: token t's slot holds its
    embedding (times sqrt(2.5 d) when K > 0, else 1), each thought slot the final-norm output of the slot before it,
    all K+1 slots at position t, causal over the slots in order; the last slot's output is scored. (B, T, V)."""
    K, d = model.config.n_thoughts, model.config.n_embd
    e = model.wte.weight[idx] * (math.sqrt(2.5 * d) if K else 1.0)
    slots, pos, logits = [], [], []
    for t in range(idx.size(1)):
        slots.append(e[:, t])
        pos.append(t)
        for _ in range(K):
            slots.append(ref_neox_run(model, torch.stack(slots, 1), pos)[:, -1])
            pos.append(t)
        logits.append(ref_neox_run(model, torch.stack(slots, 1), pos)[:, -1] @ model.lm_head.weight.T)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("K", [0, 1, 2])
def test_neox_jacobi_forward_and_gradients_equal_the_independent_reference(K):
    """With (T-1)K Jacobi passes the neox training forward is the exact recurrence, and so are its gradients, for
    every parameter (biases and LayerNorm shifts included)."""
    model = tiny_neox(K).train()
    idx, targets = neox_tokens(), neox_tokens(seed=2)
    ref_logits = ref_neox_ponderlm2(model, idx)
    ref_grads = param_grads(model, F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()))
    logits, loss = model(idx, targets, jacobi=(idx.size(1) - 1) * K)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    for name, g in param_grads(model, loss).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("K", [0, 1, 2])
def test_neox_cached_decoding_equals_the_forward_with_exact_thoughts(K):
    model = tiny_neox(K)
    idx = neox_tokens()
    exact, _ = model(idx, jacobi="exact")
    cache = model.new_cache()
    stepped = torch.stack([model.step(idx[:, t], cache)[0] for t in range(idx.size(1))], dim=1)
    torch.testing.assert_close(stepped, exact, rtol=0, atol=1e-10)
    cache = model.new_cache()
    logits, thoughts = model.prefill(idx[:, :5], cache)
    assert thoughts.shape == (2, K, 16)
    torch.testing.assert_close(logits, exact[:, 4], rtol=0, atol=1e-10)
    for t in range(5, idx.size(1)):
        logits, _ = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, exact[:, t], rtol=0, atol=1e-10)


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
    """GPTNeoXForCausalLM's logits, float64, written from the checkpoint's own tensors: each head's [q_h, k_h, v_h]
    cut from the fused query_key_value output, rotary by rotate_half on the first rotary_pct of each head,
    attention and MLP both added to the block's input, final LayerNorm, embed_out."""
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


@pytest.mark.parametrize("form, dtype", [("safetensors", torch.float32), ("bin", torch.float32),
                                         ("sharded safetensors", torch.bfloat16), ("sharded bin", torch.float16),
                                         ("safetensors", torch.float16)])
def test_a_gpt_neox_checkpoint_gives_the_logits_gpt_neox_defines(tmp_path, form, dtype):
    """Loaded and run in float64, the K = 0 neox model equals GPT-NeoX computed from the checkpoint's own tensors.
    fp16 and bf16 weights convert to float32 exactly, so both sides hold the same numbers."""
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
    cfg = {k: v for k, v in HF_CONFIG.items() if k not in ("rotary_pct", "rotary_emb_base")}
    config, _ = pretrained.load_neox(hf_folder(tmp_path / "ckpt", hf_weights(), {**cfg, **keys}))
    assert config == HF_AS_PONDER


def set_config(**kw):
    return lambda cfg, w: cfg.update(kw)


def set_weight(name, value):
    return lambda cfg, w: w.update({name: value(w)})


REFUSALS = {
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


@pytest.mark.parametrize("case", REFUSALS)
def test_anything_but_gpt_neox_as_pythia_is_refused_in_one_line(tmp_path, case):
    change, message = REFUSALS[case]
    cfg, w = dict(HF_CONFIG), hf_weights()
    change(cfg, w)
    folder = hf_folder(tmp_path / "ckpt", w, cfg)
    with pytest.raises(ValueError) as e:
        pretrained.load_neox(folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["no folder", "no config", "no weights", "missing shard", "truncated"])
def test_missing_or_damaged_files_are_refused_in_one_line(tmp_path, case):
    folder = hf_folder(tmp_path / "ckpt", hf_weights(), form="sharded safetensors" if case == "missing shard"
                       else "safetensors")
    weights = folder / "model.safetensors"
    if case == "no folder":
        folder = tmp_path / "elsewhere"
    elif case == "no config":
        (folder / "config.json").unlink()
    elif case == "no weights":
        weights.unlink()
    elif case == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    message = {"no folder": "no such folder", "no config": "no config.json", "no weights": "no weights",
               "missing shard": "lists model-00002-of-00002.safetensors", "truncated": "truncated"}[case]
    with pytest.raises(ValueError) as e:
        pretrained.load_neox(folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- the checkpoint's tokenizer ------------------------------------------------------------------------------------

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
    (tmp_path / "tokenizer.json").write_text(json.dumps({"decoder": {"type": "ByteLevel"}}))
    monkeypatch.setitem(sys.modules, "tokenizers", None)               # import tokenizers now fails
    with pytest.raises(RuntimeError, match="pip install tokenizers"):
        pretrained.HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"decoder": {"type": "Metaspace"}}))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        pretrained.HFTokenizer(tmp_path)
