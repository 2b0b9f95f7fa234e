"""
PonderLM-2 in one file: a language model that thinks in continuous space before every token.

Chain-of-thought spends extra tokens; PonderLM-2 spends extra forward steps. After reading token x_t the model
emits a *latent thought* z_t: its own last hidden state (the final-norm output, the vector the LM head reads).
That vector is fed straight back in as the input of one more sequence slot, and the output of that slot predicts
x_{t+1}. With K thoughts per token every position owns K+1 consecutive slots, all at rotary position t:

    vanilla (K=0):  x1 ────────► x2 ────────► x3           x_t predicts x_{t+1}
    K = 1:          x1  z1 ────► x2  z2 ────► x3  z3       z_t predicts x_{t+1}
    K = 2:          x1  z1' z1'' ► x2  z2' z2'' ► ...      the last slot of a position is the one scored
    position:       0   0   0     1   1   1

Attention is ordinary causal attention over the interleaved slots. No parameters are added.

Decoding computes the thoughts exactly, one slot at a time, with a KV cache (`step`). Training cannot afford a
sequential pass per token, so it solves for all thoughts of a sequence at once by Jacobi (fixed-point) iteration
(`think`): start with no thoughts, run the whole interleaved sequence, feed every slot's output back as the next
slot's input, repeat. The first K passes grow the chain to K thoughts; each later pass refines all of them. Causal
attention makes this a triangular system (a slot's output depends only on the slots before it, so once those are
exact, one more pass makes it exact), so every pass makes at least one more thought exact, in order: T*K
passes in all (K growing and (T-1)*K refining) always give the exact thoughts, and in practice J = 2 or 3
refining passes get close. Gradients flow through every pass. The method in full: docs/method.md.

The network is a small Llama (RMSNorm pre-norm, rotary positions, SwiGLU, no biases, untied embeddings) or, with
arch="neox", GPT-NeoX as Pythia uses it (LayerNorm, parallel residual, GELU, biases, rotary on part of each head).
Only the block differs; the thought loop is the same.
Paper: Zeng et al., "PonderLM-2: Pretraining LLM with Latent Thoughts in Continuous Space", arXiv 2509.23184.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# Token-embedding multipliers by name. A model with thoughts uses its method's own (PonderLM-2: sqrt(2.5 d), which
# brings the embeddings to the unit RMS of the normalised hidden states that come back as thoughts: PonderLM.__init__).
EMB_SCALES = {"1": lambda d: 1.0, "sqrt_d": math.sqrt, "sqrt_2.5d": lambda d: math.sqrt(2.5 * d)}


@dataclass
class PonderConfig:
    vocab_size: int = 256
    block_size: int = 256     # maximum number of tokens T (not slots: a sequence has (K+1)*T slots)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_thoughts: int = 1       # K, latent thoughts per token; 0 is exactly a vanilla transformer
    jacobi_min: int = 2       # in training J is drawn uniformly from [jacobi_min, jacobi_max] (train.py: per step)
    jacobi_max: int = 3
    jacobi_eval: int = 3      # J in eval mode, as in the paper's evaluation
    grad_passes: int = 0      # backpropagate through only the last n passes (the final one counts); 0: all of them
    emb_scale: str = "auto"   # token-embedding multiplier: a name in EMB_SCALES, or auto (the method's own if K > 0)
    arch: str = "llama"       # the block: llama, or neox (GPT-NeoX, as in Pythia)
    rotary_pct: float = 1.0   # the fraction of each head's dimensions that rotary embeddings turn (Pythia: 0.25)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("n_thoughts", "jacobi_min", "jacobi_max", "jacobi_eval", "grad_passes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.emb_scale not in ("auto", *EMB_SCALES):
            raise ValueError(f"emb_scale must be auto, {', '.join(EMB_SCALES)}; got {self.emb_scale!r}")
        if self.arch not in BLOCKS:
            raise ValueError(f"arch must be {' or '.join(BLOCKS)}, got {self.arch!r}")
        if self.jacobi_min > self.jacobi_max:
            raise ValueError(f"jacobi_min ({self.jacobi_min}) must not exceed jacobi_max ({self.jacobi_max})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of equal size")
        if not 0 < self.rotary_pct <= 1 or self.rotary_dims < 2 or self.rotary_dims % 2:
            raise ValueError(f"rotary_pct ({self.rotary_pct}) must turn an even number of the {self.head_size} "
                             "dimensions of a head, at least 2")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self):
        return int(self.head_size * self.rotary_pct)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotate(x, cos, sin):
    """Rotary embedding: turn the pairs (x[i], x[i + half]) by the angle pos * theta_i, for i < half = cos.size(-1).
    x: (..., S, hs), e.g. q and k stacked, (2, B, nh, S, hs); cos and sin: (S, half). A head's dimensions from
    2 * half on pass unchanged (none for Llama)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every slot decoded so far, preallocated for `capacity` slots (thoughts count as slots)."""

    def __init__(self, capacity):
        self.capacity, self.length = capacity, 0
        self.k, self.v = {}, {}                       # layer -> (B, nh, capacity, hs), made at first use

    def append(self, layer, k, v):
        """Store the new slots' keys and values of one layer; return all of them so far, (B, nh, length+S, hs)."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} slots needed, {self.capacity} allocated")
        if layer not in self.k:
            shape = (*k.shape[:2], self.capacity, k.size(3))
            self.k[layer] = k.new_empty(shape)
            self.v[layer] = v.new_empty(shape)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config, layer, bias):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)

    def forward(self, x, cos, sin, cache=None):
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, S, hs)
        q, k = rotate(qkv[:2], cos, sin).unbind(0)    # (B, nh, S, hs) each: q and k rotated in one call
        v = qkv[2].contiguous()
        if cache is not None:
            k, v = cache.append(self.layer, k, v)     # (B, nh, L, hs): earlier slots first, then these S
        L = k.size(2)
        if S == L:      # a whole sequence: plain causal attention (flash kernels on GPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif S == 1:    # one new slot sees everything in the cache
            y = F.scaled_dot_product_attention(q, k, v)
        else:           # S new slots after L-S cached ones (Pause decodes a token's K+1 slots in one call)
            mask = torch.ones(S, L, dtype=torch.bool, device=x.device).tril(L - S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


@contextlib.contextmanager
def cached_attention_kernels():
    """Attention over a growing KV cache sees a new key length at every step, and cuDNN's attention kernel builds a
    plan for each new shape (sample.py decoded 12.5 tokens/s on an H200 with it, 156-171 without). Decoding runs
    with that one kernel switched off; the caller's setting, and every other kernel choice, is restored after."""
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), hidden width about 8/3 of the model width, rounded up to 64."""

    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.up = nn.Linear(config.n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Llama: pre-norm attention, then pre-norm SwiGLU, each added to the residual stream; no biases."""
    Norm = RMSNorm                                    # also the final norm of a model built from these blocks

    def __init__(self, config, layer):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer, bias=False)
        self.norm2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.mlp(self.norm2(x))


class GELU(nn.Module):
    """down(gelu(up(x))), hidden width 4d, with biases: GPT-NeoX's MLP."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class NeoXBlock(nn.Module):
    """GPT-NeoX as Pythia uses it: LayerNorm with bias, biases on every projection, and a parallel residual:
    attention and MLP both read the block's input, x + attn(norm1(x)) + mlp(norm2(x))."""
    Norm = nn.LayerNorm

    def __init__(self, config, layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer, bias=True)
        self.norm2 = nn.LayerNorm(config.n_embd, config.norm_eps)
        self.mlp = GELU(config)

    def forward(self, x, cos, sin, cache=None):
        return x + self.attn(self.norm1(x), cos, sin, cache) + self.mlp(self.norm2(x))


BLOCKS = {"llama": Block, "neox": NeoXBlock}


# ----------------------------------------------------------------------------------------------------------------
# Loss and sampling

def next_token_loss(logits, targets):
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), -1 ignored; None without targets."""
    if targets is None:
        return None
    logits = logits.flatten(0, 1)
    if logits.element_size() < 4:                  # bf16 logits: take the loss in float32
        logits = logits.float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-1)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next token from logits (B, V): argmax at temperature 0, else sample from the top_k softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature   # <= 0: no overflow at a tiny T
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# The model

class PonderLM(nn.Module):
    thinking_scale = "sqrt_2.5d"                      # the token-embedding scale when K > 0 (a baseline sets its own)

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        block = BLOCKS[c.arch]
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(block(c, i) for i in range(c.n_layer))
        self.norm_f = block.Norm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        # With thoughts, token embeddings are scaled to unit RMS to match the normalised hidden states that come
        # back as thoughts (sqrt(2.5 d) times the init std below is 1). Thoughts are not scaled.
        scale = c.emb_scale
        if scale == "auto":
            scale = self.thinking_scale if c.n_thoughts else "1"
        self.emb_scale = EMB_SCALES[scale](c.n_embd)
        # Rotary tables for token positions 0..block_size-1, derived from the config and never saved.
        r = c.rotary_dims
        inv_freq = c.rope_theta ** -(torch.arange(0, r, 2, dtype=torch.float64) / r)
        angles = torch.outer(torch.arange(c.block_size, dtype=torch.float64), inv_freq)      # (T, r/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)   # float32: MPS has no float64
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        # The authors' init: a normal truncated at 3 std, std = sqrt(2/(5d)), for every matrix and the embedding;
        # the two projections that write into the residual stream are further divided by sqrt(2 * n_layer) in
        # their Llama code and by sqrt(2 * n_layer * (K+1)) in their GPT-NeoX code. Biases start at zero.
        std = math.sqrt(2 / (5 * c.n_embd))
        depth = c.n_layer * (c.n_thoughts + 1 if c.arch == "neox" else 1)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * depth) if name.endswith(("attn.proj.weight", "down.weight")) else std
                nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding=False):
        """Parameters, the same for every K; non_embedding counts only the transformer blocks and final norm."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() - self.lm_head.weight.numel() if non_embedding else n

    def embed(self, idx):
        return self.wte(idx) * self.emb_scale       # (B, T, d)

    def run(self, x, start=0, cache=None):
        """One pass of the network. x: (B, T, n, d), n slots for each of T tokens at positions start..start+T-1
        (every slot of a token at its token's position), causal over the slots in order. Returns the final-norm
        output of every slot, (B, T, n, d): what the LM head reads, and what a thought is. With a cache, the slots'
        keys and values are appended to it and attention also sees everything cached before them."""
        B, T, n, d = x.shape
        pos = torch.arange(start, start + T, device=x.device).repeat_interleave(n)   # n = 2: p, p, p+1, p+1, ...
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)              # (T*n, r/2)
        h = x.reshape(B, T * n, d)
        for block in self.blocks:
            h = block(h, cos, sin, cache)
        if cache is not None:
            cache.length += T * n
        return self.norm_f(h).view(B, T, n, d)

    def think(self, e, jacobi):
        """The latent-thought loop: from token embeddings e (B, T, d), the slot inputs (B, T, K+1, d), each token's
        embedding followed by its K thoughts, solved for the whole sequence at once. Each pass runs the sequence and
        feeds every slot's output back in as the next slot's input. The first K passes grow the chain to K thoughts,
        the next `jacobi` passes refine all of them; jacobi="exact" goes on until they stop changing (T*K passes
        always suffice). With config.grad_passes = n > 0, all but the last n-1 passes run without gradients (the
        final pass, in forward, is the n-th): the thoughts they produce enter the later passes as constants."""
        K, T, n = self.config.n_thoughts, e.size(1), self.config.grad_passes
        x = e[:, :, None]                                 # (B, T, 1, d): the token slots, no thoughts yet
        if K == 0:
            return x                                      # a vanilla transformer has nothing to think about
        exact = jacobi == "exact"
        passes = T * K if exact else K + jacobi
        first_with_grad = passes - (n - 1) if n else 0
        grad, change = torch.is_grad_enabled(), None
        for i in range(passes):
            with torch.set_grad_enabled(grad and i >= first_with_grad):
                h = self.run(x)                           # (B, T, k, d): the output of each of the k slots so far
            # Slot j's output is slot j+1's input. While the chain is shorter than K+1 slots, h[:, :, :K] keeps
            # every output, so the chain grows by one thought; once it is full, it leaves out the last slot's
            # output, which predicts the next token and is not a thought. For K = 2, x has 1, 2, 3 slots before
            # passes 1, 2, 3, and 3 from then on.
            x, before = torch.cat([e[:, :, None], h[:, :, :K]], dim=2), x
            if exact and x.shape == before.shape:
                settled, change = self.settled(x, before, change)
                if settled:
                    break
        return x

    @staticmethod
    def settled(x, before, last_change):
        """Whether Jacobi iterates have stopped changing. They contract (about 0.35 per pass) down to rounding noise,
        a few float epsilons of their scale, and there they stall instead of becoming bitwise equal. So: settled when
        the largest change is zero, or when it is below eps^(2/3) of the scale (eps of the compute dtype, bf16 under
        autocast) and has stopped halving. Returns (settled?, this change, relative to the scale)."""
        change = ((x - before).abs().max() / before.abs().max()).item()
        if change == 0:
            return True, change
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        small = change < torch.finfo(dtype).eps ** (2 / 3)
        stalled = last_change is not None and change > last_change / 2
        return small and stalled, change

    def check(self, idx, targets=None):
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size {self.config.block_size}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(idx.shape)} like idx")

    def forward(self, idx, targets=None, jacobi=None):
        """Training forward. idx, targets: (B, T) token ids (targets -1 are ignored). jacobi: the number J of
        Jacobi passes (default: drawn from [jacobi_min, jacobi_max] in train mode, jacobi_eval in eval mode), or
        "exact" to iterate until the thoughts stop changing. Returns logits (B, T, V) and the mean loss or None."""
        self.check(idx, targets)
        if jacobi is None:
            c = self.config
            jacobi = int(torch.randint(c.jacobi_min, c.jacobi_max + 1, ())) if self.training else c.jacobi_eval
        # (train.py always passes J: one draw per optimizer step, the same on every micro-step and rank)
        if jacobi != "exact" and (not isinstance(jacobi, int) or jacobi < 0):
            raise ValueError(f"jacobi must be a non-negative int or 'exact', got {jacobi!r}")
        x = self.think(self.embed(idx), jacobi)           # (B, T, K+1, d): every token's slot and its thoughts
        h = self.run(x)                                   # the final pass reads the newest thoughts; it is scored
        # (K + J + 1 passes in all; this pass's thought-slot outputs would only be thoughts for another pass)
        logits = self.lm_head(h[:, :, -1])                # (B, T, V): the last slot of token t predicts t+1
        return logits, next_token_loss(logits, targets)

    # ------------------------------------------------------------------------------------------------------------
    # Exact decoding with a KV cache: per token, K+1 forward steps at the same position, each appending a slot.
    # No autograd, and the attention kernels that suit a growing cache.

    def new_cache(self):
        return KVCache(self.config.block_size * (self.config.n_thoughts + 1))

    @torch.inference_mode()
    def prefill(self, idx, cache, exact=True):
        """Run a prompt (B, T) into an empty cache. Its thoughts are solved by Jacobi passes, until they stop
        changing (exact) or for jacobi_eval passes (the authors' approximation), then one pass fills the cache.
        Returns the logits (B, V) for the next token and the K thoughts (B, K, d) of the prompt's last token."""
        self.check(idx)
        with cached_attention_kernels():
            x = self.think(self.embed(idx), "exact" if exact else self.config.jacobi_eval)
            h = self.run(x, cache=cache)                  # (B, T, K+1, d), and the cache holds every slot
        return self.lm_head(h[:, -1, -1]), x[:, -1, 1:]

    @torch.inference_mode()
    def step(self, idx, cache):
        """Decode one token idx (B,) at the next position: its own slot, then K thought slots, each fed the
        final-norm output of the slot before it. Returns next-token logits (B, V) and the thoughts (B, K, d)."""
        K = self.config.n_thoughts
        p = cache.length // (K + 1)                       # every earlier token holds K+1 slots of the cache
        if p >= self.config.block_size:
            raise ValueError(f"position {p} is past block_size {self.config.block_size}: start a new cache")
        thoughts = []
        with cached_attention_kernels():
            h = self.run(self.embed(idx)[:, None, None], p, cache)     # (B, 1, 1, d): the token's slot
            for _ in range(K):
                thoughts.append(h[:, 0])
                h = self.run(h, p, cache)                 # the latent thought: the output goes back in
        return self.lm_head(h[:, 0, 0]), torch.cat(thoughts, dim=1) if K else h[:, 0, :0]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, exact_prefill=True, generator=None):
        """Continue the prompts idx (B, T). Yields, per new token, (token (B,), the K thoughts (B, K, d) that
        preceded it). When the context is full, the last block_size/2 tokens (at least one) are prefilled again
        and decoding goes on from there."""
        T_max = self.config.block_size
        idx = idx[:, -T_max:]
        cache = self.new_cache()
        logits, thoughts = self.prefill(idx, cache, exact_prefill)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            yield token, thoughts
            if i == max_new_tokens - 1:
                break
            idx = torch.cat([idx, token[:, None]], dim=1)
            if idx.size(1) > T_max:                       # no position left for it: restart from the recent half
                idx = idx[:, -max(1, T_max // 2):]
                cache = self.new_cache()
                logits, thoughts = self.prefill(idx, cache, exact_prefill)
            else:
                logits, thoughts = self.step(token, cache)

    # ------------------------------------------------------------------------------------------------------------
    # Cost. Matmuls count 2 FLOPs per weight per slot; attention counts 4*d FLOPs per layer per (query slot, key
    # slot) over a full context of block_size tokens, as PaLM does. A backward pass costs twice its forward.

    def pass_flops(self, n):
        """Forward FLOPs per token of one pass over the blocks with n slots per token (the LM head excluded)."""
        c = self.config
        N = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)     # weights of the block matmuls
        return n * (2 * N + 4 * c.n_layer * c.n_embd * n * c.block_size)

    def head_flops(self):
        return 2 * self.config.n_embd * self.config.vocab_size

    def flops_per_token(self, training=True, jacobi=None):
        """Model FLOPs per token: a training step (forward + backward over J Jacobi passes, averaged over the
        training range of J unless given; passes without gradients cost their forward only) or decoding."""
        c, K = self.config, self.config.n_thoughts
        if not training:
            return self.pass_flops(K + 1) + self.head_flops()   # K+1 steps, each attending to (K+1)*T slots

        def step(J):                                      # the passes of one training forward, in order
            passes = [self.pass_flops(n) for n in range(1, K + 1)] + [self.pass_flops(K + 1)] * (J if K else 0)
            passes.append(self.pass_flops(K + 1) + self.head_flops())              # the final, scored pass
            g = min(c.grad_passes, len(passes)) if c.grad_passes else len(passes)  # the last g get a backward
            return sum(passes[:-g]) + 3 * sum(passes[-g:])

        Js = range(c.jacobi_min, c.jacobi_max + 1) if jacobi is None else [jacobi]
        return sum(step(J) for J in Js) / len(Js)
