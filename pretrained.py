"""
Start from a pretrained GPT-NeoX (Pythia): a local copy of a Hugging Face checkpoint folder, read into ponder's
arch="neox" model, and its tokenizer.

    config, state = load_neox("pythia-70m")           # the folder as downloaded from the Hub
    model = PonderLM(PonderConfig(**config))          # K = 0 is exactly the checkpoint's own model
    model.load_state_dict(state)                      # the same weights fit any K: thoughts add no parameters
    tok = HFTokenizer("pythia-70m")                   # its tokenizer.json; needs `pip install tokenizers`

The folder holds config.json, the weights (model.safetensors or pytorch_model.bin, or shards of either listed in
model.safetensors.index.json / pytorch_model.bin.index.json) and tokenizer.json. Only the architecture ponder
computes exactly is accepted, GPT-NeoX as Pythia uses it: parallel residual, exact GELU MLP of width 4d, biases,
untied embeddings, plain rotary on part of each head. Anything else is refused with a one-line ValueError that
says what differs. Safetensors files are read here, without the safetensors package; weights stored in fp16 or
bf16 come back as float32.
"""

import json
import math
from pathlib import Path

import torch

from ponder import PonderConfig

SUPPORTED = ("supported: GPT-NeoX as Pythia uses it (model_type gpt_neox, parallel residual, exact gelu, MLP width 4d, "
             "biases, untied embeddings, unscaled rotary)")


def refuse(where, what):
    raise ValueError(f"{where}: {what}; {SUPPORTED}")


# ---- config.json -> PonderConfig ---------------------------------------------------------------------------------

def read_json(path):
    """A JSON file of the folder, or a ValueError that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_config(folder):
    """config.json, checked, as keyword arguments for PonderConfig."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such folder (expected a Hugging Face checkpoint folder with config.json)")
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    hf = read_json(path)
    # What the checkpoint must be. Absent keys take Hugging Face's defaults, which are Pythia's.
    if hf.get("model_type") != "gpt_neox":
        refuse(path, f"model_type is {hf.get('model_type')!r}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings") if not isinstance(hf.get(k), int)]
    if missing:
        refuse(path, f"{', '.join(missing)} missing or not an integer")
    if not hf.get("use_parallel_residual", True):
        refuse(path, "use_parallel_residual is false (a sequential residual)")
    if hf.get("hidden_act", "gelu") != "gelu":
        refuse(path, f"hidden_act is {hf['hidden_act']!r}, not gelu (exact erf GELU)")
    if hf["intermediate_size"] != 4 * hf["hidden_size"]:
        refuse(path, f"intermediate_size {hf['intermediate_size']} is not 4 * hidden_size ({4 * hf['hidden_size']})")
    if hf.get("tie_word_embeddings", False):
        refuse(path, "tie_word_embeddings is true (tied input and output embeddings)")
    if not hf.get("attention_bias", True):
        refuse(path, "attention_bias is false (attention without biases)")
    # Rotary settings under their generations of names: rotary_pct and rotary_emb_base (Pythia's config.json),
    # partial_rotary_factor and rope_theta, at the top level or in newer transformers' rope_parameters.
    ropes = [hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}]
    for key, rope, usual in zip(("rope_parameters", "rope_scaling"), ropes, ("default", None)):
        kind = rope.get("rope_type", rope.get("type", usual))
        if rope and kind != "default":
            refuse(path, f"{key} is set ({rope}): scaled rotary embeddings")

    def setting(*names, default):
        return next((d[n] for n in names for d in (*ropes, hf) if d.get(n) is not None), default)

    config = dict(
        arch="neox",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        rotary_pct=setting("partial_rotary_factor", "rotary_pct", default=0.25),
        rope_theta=float(setting("rope_theta", "rotary_emb_base", default=10000)),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        n_thoughts=0,
        emb_scale="1",        # the checkpoint reads its embeddings unscaled, also if thoughts are added later
    )
    try:
        PonderConfig(**config)                         # ponder's own checks: head split, rotary dims, ...
    except ValueError as e:
        refuse(path, str(e))
    return config


# ---- the weights files -------------------------------------------------------------------------------------------

# Buffers some checkpoints carry besides the parameters (a causal mask, a masking constant, rotary frequencies).
# ponder derives all three, so they are skipped.
IGNORED = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path, keep=lambda name: True):
    """The tensors of a .safetensors file whose names pass keep(). The format: an 8-byte little-endian header
    length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, optionally __metadata__}, then
    the raw little-endian tensor bytes, offsets counted from the end of the header."""
    size = Path(path).stat().st_size
    tensors = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if isinstance(header, dict):
            header.pop("__metadata__", None)
        if not isinstance(header, dict) or not all(isinstance(info, dict) and {"dtype", "shape", "data_offsets"}
                                                   <= info.keys() for info in header.values()):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)")
        if 8 + n + max((info["data_offsets"][1] for info in header.values()), default=0) > size:
            raise ValueError(f"{path} is shorter than its header says: a truncated file (an incomplete download?)")
        for name, info in header.items():
            if not keep(name):
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which this reader does not know")
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{path}: {name} does not fit its offsets (a damaged file)")
            data = bytearray(end - begin)             # writable, so torch can use it without a copy
            f.seek(8 + n + begin)
            f.readinto(data)
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)   # (no empty buffers)
            tensors[name] = t.reshape(shape)
    return tensors


def read_weights(folder):
    """Every tensor of the checkpoint but the IGNORED buffers, by Hugging Face name: from model.safetensors,
    pytorch_model.bin, or the shards an .index.json lists (safetensors preferred)."""
    folder = Path(folder)
    keep = lambda name: not name.endswith(IGNORED)   # noqa: E731
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            files = [folder / name]
            break
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError):
                raise ValueError(f"{index}: not a weights index (a JSON with a weight_map)") from None
            files = [folder / s for s in shards]
            absent = [s for s, f in zip(shards, files) if not f.is_file()]
            if absent:
                raise ValueError(f"{index} lists {', '.join(absent)}, not in {folder}: an incomplete download?")
            break
    else:
        raise ValueError(f"{folder}: no weights (model.safetensors, pytorch_model.bin, or an .index.json of shards)")
    tensors = {}
    for f in files:
        if f.suffix == ".safetensors":
            tensors.update(read_safetensors(f, keep))
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # torch reports damaged or foreign files in many ways
                raise ValueError(f"{f}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
            tensors.update({k: v for k, v in state.items() if keep(k)})
    return tensors


# ---- Hugging Face names and layout -> ponder's ----------------------------------------------------------------

def layout(config):
    """For each tensor of a Hugging Face GPT-NeoX checkpoint of this config: its name in ponder, and its shape."""
    d, V = config["n_embd"], config["vocab_size"]
    table = {"gpt_neox.embed_in.weight": ("wte.weight", (V, d)), "embed_out.weight": ("lm_head.weight", (V, d)),
             "gpt_neox.final_layer_norm.weight": ("norm_f.weight", (d,)),
             "gpt_neox.final_layer_norm.bias": ("norm_f.bias", (d,))}
    parts = {"input_layernorm": ("norm1", d, None), "post_attention_layernorm": ("norm2", d, None),
             "attention.query_key_value": ("attn.qkv", 3 * d, d), "attention.dense": ("attn.proj", d, d),
             "mlp.dense_h_to_4h": ("mlp.up", 4 * d, d), "mlp.dense_4h_to_h": ("mlp.down", d, 4 * d)}
    for i in range(config["n_layer"]):
        for hf, (ours, rows, cols) in parts.items():
            table[f"gpt_neox.layers.{i}.{hf}.weight"] = (f"blocks.{i}.{ours}.weight", (rows, cols) if cols else (d,))
            table[f"gpt_neox.layers.{i}.{hf}.bias"] = (f"blocks.{i}.{ours}.bias", (rows,))
    return table


def qkv_per_head_to_stacked(t, n_head):
    """GPT-NeoX's fused query_key_value output is grouped per head, [q_h; k_h; v_h] for each head h in turn;
    ponder's is [q; k; v], each (n_head, head_size) row-major. Reorders the rows of a weight (3d, d) or bias (3d,)."""
    return t.reshape(n_head, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def load_neox(folder):
    """A Hugging Face GPT-NeoX checkpoint folder as (PonderConfig keyword arguments, state dict in ponder's names
    and layout, float32). Raises ValueError, in one line, for anything that is not exactly this architecture."""
    config = read_config(folder)
    tensors = read_weights(folder)
    table = layout(config)
    for what, names in [("missing", table.keys() - tensors.keys()), ("unexpected", tensors.keys() - table.keys())]:
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            refuse(folder, f"{what} tensor {min(names)}{more}")
    state = {}
    for hf_name, t in tensors.items():
        name, shape = table[hf_name]
        if tuple(t.shape) != shape:
            refuse(folder, f"{hf_name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if not t.is_floating_point():
            refuse(folder, f"{hf_name} is {t.dtype} (a quantized checkpoint?)")
        t = t.float()                                 # fp16 and bf16 checkpoints too
        state[name] = qkv_per_head_to_stacked(t, config["n_head"]) if ".attn.qkv." in name else t
    return config, state


# ---- the tokenizer ---------------------------------------------------------------------------------------------

def byte_level_alphabet():
    """Byte-level BPE (GPT-2's, GPT-NeoX's) writes every byte as one printable character: the printable Latin-1
    bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') as themselves, the other 68 (controls, space, 0x7f-0xa0, 0xad) as
    chr(256), chr(257), ... in byte order. Returns that character -> byte map."""
    printable = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def tokenizer_name(folder):
    """What a checkpoint stores to find this folder's tokenizer again: the absolute path of its tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    return str(path.resolve())


class HFTokenizer:
    """A checkpoint's tokenizer.json, byte-level BPE as GPT-NeoX and Pythia use it, with the interface of the
    tokenizers in data/prepare.py: name, vocab_size, eot, encode, token_bytes, decode. `path` is the tokenizer.json
    or the folder holding it. Needs the tokenizers package, which this project does not otherwise require."""

    def __init__(self, path):
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        spec = read_json(path)
        if not isinstance(spec, dict) or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{path}: not a byte-level BPE tokenizer (the kind GPT-NeoX uses, the only one "
                             "supported)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(f"the tokenizer {path} needs the tokenizers package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(str(path))
        # Special tokens in the text are text, as with tiktoken's encode_ordinary in GPT2Tokenizer: a document that
        # mentions <|endoftext|> is not cut there. Only the separators prepare.py inserts are eot.
        self.tok.encode_special_tokens = True
        self.name = str(path.resolve())
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot = self.tok.token_to_id("<|endoftext|>")
        # Every token's bytes, once. Vocabulary tokens are written in the byte-level alphabet and read back through
        # it; a string with a character outside the alphabet is kept as its UTF-8, as the tokenizers library's
        # ByteLevel decoder does. Added tokens (<|endoftext|>, Pythia's runs of spaces) are literal text: their
        # UTF-8. (The library's own decode puts them through the alphabet too, which only changes one that has
        # characters of the alphabet outside ASCII, none of Pythia's.)
        alphabet = byte_level_alphabet()
        added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        self.bytes = []
        for i in range(self.vocab_size):
            s = added[i] if i in added else self.tok.id_to_token(i) or ""
            literal = i in added or any(c not in alphabet for c in s)
            self.bytes.append(s.encode("utf-8") if literal else bytes(alphabet[c] for c in s))

    def encode(self, text):
        text = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, i):
        return self.bytes[i] if 0 <= i < self.vocab_size else b""       # the embedding's padding rows: nothing

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
