"""
The paper's other ways of spending extra compute per token, built on ponder.py's model so that only the use of the
extra compute differs: the same blocks, initialisation, data, optimiser and plain next-token loss.

    Pause     x1 p p p ─► x2 p p p ─► ...       K copies of one learned pause vector after every token
    Loop      x ─► blocks ─► blocks ─► ... ─►    the whole block stack run K+1 times, weights shared
    PonderLM  x ─► run ─► softmax ─► x + mix ─►  K extra passes, each adding the predicted distribution's
                                                 expected embedding to the token's own (the predecessor method)

The paper runs each with K = 3. Unlike PonderLM-2, none needs Jacobi iteration: one parallel forward computes each
exactly (`jacobi` is accepted and ignored), so prefill and step are the same computation over new tokens, and the
cached decoder equals the forward up to rounding. K = 0 is the vanilla model for every method. Each class keeps
PonderLM's interface: forward(idx, targets) -> (logits, loss), prefill/step/generate, flops_per_token. Their
"thoughts" (what sample.py --show_thoughts prints) are the final-norm outputs of the K steps before the scored one.
Each is stated precisely in docs/method.md#the-baselines.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ponder import KVCache, PonderLM, cached_attention_kernels, next_token_loss


class Baseline(PonderLM):
    """What the three share: exact in one forward, so prefill and step are `decode` over 1 or more new tokens."""

    @torch.inference_mode()
    def prefill(self, idx, cache, exact=True):
        self.check(idx)
        with cached_attention_kernels():
            return self.decode(idx, cache)

    @torch.inference_mode()
    def step(self, idx, cache):
        with cached_attention_kernels():
            return self.decode(idx[:, None], cache)

    def room(self, start, S):
        """The first position of S new tokens after `start` decoded ones; an error if they do not fit."""
        if start + S > self.config.block_size:
            raise ValueError(f"position {start + S - 1} is past block_size {self.config.block_size}: start a new cache")
        return start

    def flops_per_token(self, training=True, jacobi=None):
        return 3 * self.forward_flops() if training else self.forward_flops()    # backward = 2 forwards


class Pause(Baseline):
    """Token t owns K+1 slots at rotary position t: its embedding, then K copies of one learned pause vector p.
    One causal pass over the (K+1)*T slots; the last pause slot of a token predicts the next token."""
    thinking_scale = "sqrt_d"                               # the authors' scale for Pause, on token and pause

    def __init__(self, config):
        super().__init__(config)
        if config.n_thoughts:                               # K = 0 has no pause slot: exactly the vanilla model
            std = math.sqrt(2 / (5 * config.n_embd))
            self.pause = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, config.n_embd), std=std, a=-3 * std,
                                                            b=3 * std))   # (1, d): decayed like an embedding row

    def slots(self, idx):
        """(B, T) token ids -> (B, T, K+1, d) slot inputs: each token, then its K pauses."""
        e = self.embed(idx)[:, :, None]
        B, T, _, d = e.shape
        K = self.config.n_thoughts
        return torch.cat([e, (self.pause * self.emb_scale).expand(B, T, K, d)], dim=2) if K else e

    def forward(self, idx, targets=None, jacobi=None):
        self.check(idx, targets)
        h = self.run(self.slots(idx))                           # (B, T, K+1, d)
        logits = self.lm_head(h[:, :, -1])                      # the last pause slot predicts the next token
        return logits, next_token_loss(logits, targets)

    def decode(self, idx, cache):
        """Append S tokens (B, S) and their pauses to the cache: the S*(K+1) slots in one call."""
        start = self.room(cache.length // (self.config.n_thoughts + 1), idx.size(1))
        h = self.run(self.slots(idx), start, cache)             # (B, S, K+1, d)
        return self.lm_head(h[:, -1, -1]), h[:, -1, :-1]

    def forward_flops(self):
        return self.pass_flops(self.config.n_thoughts + 1) + self.head_flops()


class Loop(Baseline):
    """The block stack applied K+1 times with shared weights to the plain T-token sequence. The raw residual
    stream goes from one loop to the next: no norm between loops, no re-added embedding, no loop index."""

    def new_cache(self):
        return [KVCache(self.config.block_size) for _ in range(self.config.n_thoughts + 1)]   # one per loop

    def loops(self, idx, start, caches=None):
        """The residual stream (B, S, d) after each of the K+1 loops, for S tokens at positions start, start+1, ..."""
        r, out = self.embed(idx), []                            # embed() scales by sqrt(2.5 d), as PonderLM-2
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        cos, sin = self.cos[pos].to(r.dtype), self.sin[pos].to(r.dtype)
        for k in range(self.config.n_thoughts + 1):
            cache = caches[k] if caches else None
            for block in self.blocks:                           # ponder.run without its final norm
                r = block(r, cos, sin, cache)
            if cache is not None:
                cache.length += idx.size(1)
            out.append(r)
        return out

    def forward(self, idx, targets=None, jacobi=None):
        self.check(idx, targets)
        logits = self.lm_head(self.norm_f(self.loops(idx, 0)[-1]))
        return logits, next_token_loss(logits, targets)

    def decode(self, idx, caches):
        out = self.loops(idx, self.room(caches[0].length, idx.size(1)), caches)
        h = self.norm_f(torch.stack([r[:, -1] for r in out], dim=1))     # (B, K+1, d)
        return self.lm_head(h[:, -1]), h[:, :-1]

    def forward_flops(self):
        return (self.config.n_thoughts + 1) * self.pass_flops(1) + self.head_flops()


class PonderLMv1(Baseline):
    """PonderLM: pass 0 reads the token embeddings E. After each of the first K passes, the predicted distribution
    q = softmax(head(h)) becomes the expected embedding q @ W, scaled like E, and pass k+1 reads E + that mixture
    (the latest one only). Only the last pass is scored; gradients flow through every pass and every softmax."""
    thinking_scale = "sqrt_d"

    def new_cache(self):
        return [KVCache(self.config.block_size) for _ in range(self.config.n_thoughts + 1)]   # one per pass

    def passes(self, idx, start, caches=None):
        """The final-norm output (B, S, d) of each of the K+1 passes."""
        e = self.embed(idx)
        x, out = e, []
        for k in range(self.config.n_thoughts + 1):
            out.append(self.run(x[:, :, None], start, caches[k] if caches else None)[:, :, 0])
            if k < self.config.n_thoughts:
                q = F.softmax(self.lm_head(out[-1]), dim=-1)                 # (B, S, V) over the whole vocabulary
                x = e + (q @ self.wte.weight) * self.emb_scale
        return out

    def forward(self, idx, targets=None, jacobi=None):
        self.check(idx, targets)
        logits = self.lm_head(self.passes(idx, 0)[-1])
        return logits, next_token_loss(logits, targets)

    def decode(self, idx, caches):
        out = self.passes(idx, self.room(caches[0].length, idx.size(1)), caches)
        h = torch.stack([o[:, -1] for o in out], dim=1)         # (B, K+1, d)
        return self.lm_head(h[:, -1]), h[:, :-1]

    def forward_flops(self):
        K = self.config.n_thoughts
        return (K + 1) * self.pass_flops(1) + (2 * K + 1) * self.head_flops()    # head and mixture: 2 per extra pass


METHODS = {"ponderlm2": PonderLM, "pause": Pause, "loop": Loop, "ponderlm": PonderLMv1}


def build(method, config):
    """The model of a method name (train.py --method) for a PonderConfig; K is config.n_thoughts for every one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    return METHODS[method](config)
