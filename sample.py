"""
Sample from a model trained by train.py, one token at a time; for PonderLM-2 with K latent thoughts before every
token (a baseline decodes with its own exact cache, a vanilla model plainly).

    python sample.py                                   # continue "\\n" three times, from out/ckpt.pt
    python sample.py --start="def merge(" --show_thoughts
    python sample.py --start=FILE:prompt.txt --temperature=0 --max_new_tokens=200
    python sample.py --init_from=pythia-70m --start="The capital of France is"     # a local Hugging Face folder

Text goes to stdout; notes, the legend and the speed go to stderr.
"""

import codecs
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import common
from common import Fail, opt
from data.prepare import get_tokenizer


@dataclass
class SampleConfig:
    init_from: str = opt("resume", "resume (the checkpoint in out_dir), or a PATH: a train.py checkpoint or out_dir, "
                                   "or a local Hugging Face GPT-NeoX folder (such as Pythia's)")
    out_dir: str = opt("out", "folder with the ckpt.pt of a train.py run")
    start: str = opt("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = opt(3, "how many continuations")
    max_new_tokens: int = opt(400, "tokens per continuation")
    temperature: float = opt(0.8, "softmax temperature; 0 picks the most likely token")
    top_k: int = opt(200, "sample among the top_k most likely tokens")
    seed: int = opt(1337, "random seed: the same seed gives the same text")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (bfloat16 on GPUs that have it natively, else float32), bfloat16 or float32")
    prefill: str = opt("exact", "exact (iterate until the prompt's thoughts are fixed) or jacobi (jacobi_eval passes)")
    show_thoughts: bool = opt(False, "print each latent thought, as the tokens it would decode to, between the tokens")
    thought_tokens: int = opt(3, "with --show_thoughts: top tokens shown per thought")

    def check(self):
        if self.temperature < 0:
            raise Fail(f"--temperature must be >= 0, got {self.temperature}")
        if min(self.top_k, self.num_samples, self.max_new_tokens, self.thought_tokens) < 1:
            raise Fail("--top_k, --num_samples, --max_new_tokens and --thought_tokens must be at least 1")
        if not 0 <= self.seed < 2**63:
            raise Fail(f"--seed must be within [0, 2**63), got {self.seed}")
        if self.prefill not in ("exact", "jacobi"):
            raise Fail(f"--prefill={self.prefill}: use exact or jacobi")
        if self.start.startswith("FILE:") and not self.start[5:].strip():
            raise Fail("--start=FILE: needs a file name after the colon, e.g. --start=FILE:prompt.txt")


def note(text):
    """A line for the person watching, on stderr (dropped if stderr is closed: never mixed into the text)."""
    if sys.stderr is not None:
        print(text, file=sys.stderr, flush=True)


def readable(b):
    """A token's bytes for display inside a thought: whitespace and control characters made visible."""
    s = b.decode("utf-8", errors="backslashreplace")
    s = s.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def main(argv=None):
    cfg, _ = common.parse_options(SampleConfig, argv, "Sample from a model trained by train.py.")
    cfg.check()
    if sys.stdout is None:
        raise Fail("standard output is closed: there is nowhere to write the text")
    device, kind, dtype = common.pick_device(cfg.device, cfg.dtype)

    # ---- the model and its tokenizer: from out_dir's checkpoint, another checkpoint, or a Hugging Face folder ------
    path = Path(cfg.out_dir) / "ckpt.pt" if cfg.init_from == "resume" else common.source_path(cfg.init_from)
    if not path.exists():
        raise Fail(f"no checkpoint at {path}: train one with `python train.py` (or pass --out_dir or --init_from)")
    ckpt = common.load_source(path)                     # a train.py checkpoint, or the folder's weights in our names
    model = common.model_from(ckpt, path).eval().to(device)
    try:
        tok = get_tokenizer(ckpt.get("tokenizer", "bytes"))
    except (RuntimeError, ValueError, OSError) as e:
        raise Fail(f"{path}: {e}") from None
    K, T, V = model.config.n_thoughts, model.config.block_size, model.config.vocab_size
    method = ckpt.get("method", "ponderlm2")
    if cfg.show_thoughts and cfg.thought_tokens > V:
        raise Fail(f"--thought_tokens={cfg.thought_tokens} is more than the vocabulary ({V} tokens)")

    # ---- the prompt: bytes that are not UTF-8 (in the argument, the file or the output) become U+FFFD ----------------
    start = cfg.start.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if getattr(sys.stdout, "reconfigure", None):
        sys.stdout.reconfigure(errors="replace")
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise Fail(f"cannot read the prompt file {start[5:]}: {e.strerror}") from None
    ids = tok.encode(start)
    if not ids:
        raise Fail("the prompt is empty: give at least one character with --start")
    if len(ids) > T:                                    # the model has positions for block_size tokens only
        note(f"note: the prompt has {len(ids)} tokens; keeping its last {T} (block_size)")
        ids = ids[-T:]
    prompt = torch.tensor([ids], device=device)

    # Thoughts, if shown, are printed dimmed on a terminal, as the tokens the LM head would read from them.
    dim, reset = ("\033[2;36m", "\033[0m") if sys.stdout.isatty() else ("", "")
    if cfg.show_thoughts:
        steps = f"thinks {K} latent thought(s)" if method == "ponderlm2" else f"takes {K} extra step(s) ({method})"
        note(f"legend: before each token the model {steps}. Each ⟦...⟧ is the output of one such step, shown as the "
             f"{cfg.thought_tokens} tokens the LM head would read from it, with probabilities (␣ space, ↵ newline, "
             "⇥ tab); the real text goes on between them.")

    # ---- decoding: model.generate runs the exact recurrence with a KV cache (ponder.py's prefill and step) ----------
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    generator = torch.Generator(device).manual_seed(cfg.seed)     # the same seed gives the same text
    samples, n_tokens, seconds = [], 0, 0.0
    for i in range(cfg.num_samples):
        note(f"---------- sample {i + 1}/{cfg.num_samples}")
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a token may end inside a character
        sys.stdout.write(tok.decode(ids))
        out = []
        t0 = time.perf_counter()
        with autocast, torch.inference_mode():
            for token, thoughts in model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                                  exact_prefill=cfg.prefill == "exact", generator=generator):
                if cfg.show_thoughts:                   # thoughts: (1, K, d), read through the LM head
                    probs = torch.softmax(model.lm_head(thoughts[0]).float(), dim=-1)       # (K, V)
                    top = torch.topk(probs, cfg.thought_tokens)
                    for p, t in zip(top.values.tolist(), top.indices.tolist()):
                        shown = " ".join(f"{readable(tok.token_bytes(j))} {q:.0%}" for q, j in zip(p, t))
                        sys.stdout.write(f"{dim}⟦{shown}⟧{reset}")
                out.append(token.item())
                sys.stdout.write(text.decode(tok.token_bytes(out[-1])))
                sys.stdout.flush()
        if kind == "cuda":
            torch.cuda.synchronize()                    # the clock must not stop before the GPU does
        seconds += time.perf_counter() - t0
        print(text.decode(b"", final=True), flush=True)
        samples.append(out)
        n_tokens += len(out)
    note(f"---------- {n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s, {(K + 1) * n_tokens / seconds:.1f}"
         f" forward steps/s ({method}, K={K}, {device}, {dtype}, prompt prefill included)")
    return samples


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        note(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        note("\ninterrupted")
        sys.exit(130)
    except BrokenPipeError:                       # the reader went away (`python sample.py | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())      # no second error when Python flushes
        sys.exit(0)
    except OSError as e:                          # e.g. > /dev/full
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        note(f"error: cannot write the text ({e.strerror or e})")
        sys.exit(1)
