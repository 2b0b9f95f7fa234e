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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import common
from common import Fail, note, opt
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
    threads: int = opt(0, "CPU threads for torch; 0 (auto): 1 for models under 16 M parameters, whose decoding is a "
                          "chain of tiny calls that a second thread only slows down, torch's default for bigger ones")
    prefill: str = opt("exact", "exact (iterate until the prompt's thoughts are fixed) or jacobi (jacobi_eval passes)")
    show_thoughts: bool = opt(False, "print each latent thought, as the tokens it would decode to, between the tokens")
    thought_tokens: int = opt(3, "with --show_thoughts: top tokens shown per thought")

    def check(self):
        if self.temperature < 0:
            raise Fail(f"--temperature must be >= 0, got {self.temperature}")
        if min(self.top_k, self.num_samples, self.max_new_tokens, self.thought_tokens) < 1:
            raise Fail("--top_k, --num_samples, --max_new_tokens and --thought_tokens must be at least 1")
        if self.threads < 0:
            raise Fail(f"--threads must be >= 0 (0: auto), got {self.threads}")
        if not 0 <= self.seed < 2**63:
            raise Fail(f"--seed must be within [0, 2**63), got {self.seed}")
        if self.prefill not in ("exact", "jacobi"):
            raise Fail(f"--prefill={self.prefill}: use exact or jacobi")
        if self.start.startswith("FILE:") and not self.start[5:].strip():
            raise Fail("--start=FILE: needs a file name after the colon, e.g. --start=FILE:prompt.txt")


def prompt_text(start):
    """The prompt: the --start text, or a file's. Bytes that are not UTF-8 become U+FFFD, never an exception."""
    start = start.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if not start.startswith("FILE:"):
        return start
    try:
        return Path(start[5:]).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise Fail(f"cannot read the prompt file {start[5:]}: {e.strerror}") from None


def readable(b):
    """A token's bytes for display inside a thought: whitespace and control characters made visible."""
    s = b.decode("utf-8", errors="backslashreplace")
    s = s.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def main(argv=None):
    cfg, _ = common.parse_options(SampleConfig, argv, "Sample from a model trained by train.py.")
    cfg.check()
    if sys.stdout is None:                              # started with stdout closed (>&-)
        raise Fail("standard output is closed: there is nowhere to write the text")
    sys.stdout.reconfigure(errors="replace")            # a character the terminal cannot show is never an error
    device, kind, dtype = common.pick_device(cfg.device, cfg.dtype)

    # ---- the model and its tokenizer: out_dir's checkpoint, another checkpoint, or a Hugging Face folder --------
    path = Path(cfg.out_dir) / "ckpt.pt" if cfg.init_from == "resume" else common.source_path(cfg.init_from)
    if not path.exists():
        raise Fail(f"no checkpoint at {path}: train one with `python train.py` (or pass --out_dir or --init_from)")
    # A train.py checkpoint carries its model_config and method; a Hugging Face folder is read and renamed into
    # ponder's names by pretrained.py. Either way: the weights, and how to build the model around them.
    ckpt = common.load_source(path)
    model = common.model_from(ckpt, path).eval().to(device)
    try:
        tok = get_tokenizer(ckpt.get("tokenizer", "bytes"))     # the one the model was trained with
    except (RuntimeError, ValueError, OSError) as e:
        raise Fail(f"{path}: {e}") from None
    K, T, method = model.config.n_thoughts, model.config.block_size, ckpt.get("method", "ponderlm2")
    if kind == "cpu":   # measured on a busy 2-core machine: 1 thread decoded 0.5 M and 11 M models 2x and 4x faster
        small = sum(p.numel() for p in model.parameters()) < 16e6
        torch.set_num_threads(cfg.threads or (1 if small else torch.get_num_threads()))
    if cfg.show_thoughts and cfg.thought_tokens > model.config.vocab_size:
        raise Fail(f"--thought_tokens={cfg.thought_tokens} is more than the vocabulary ({model.config.vocab_size})")

    ids = list(tok.encode(prompt_text(cfg.start)))
    if not ids:
        raise Fail("the prompt is empty: give at least one character with --start")
    if len(ids) > T:                                    # the model has positions for block_size tokens only
        note(f"note: the prompt has {len(ids)} tokens; keeping its last {T} (block_size)")
        ids = ids[-T:]
    prompt = torch.tensor([ids], device=device)         # (1, T): one sample at a time

    # With --show_thoughts each thought is printed as what the LM head would read from it: its top tokens, dimmed
    # on a terminal. (The head was trained only on the last slot of each token; what it makes of a thought is a
    # glimpse, not a decoding.)
    dim, reset = ("\033[2;36m", "\033[0m") if sys.stdout.isatty() else ("", "")
    if cfg.show_thoughts:
        steps = f"thinks {K} latent thought(s)" if method == "ponderlm2" else f"takes {K} extra step(s) ({method})"
        note(f"legend: before each token the model {steps}. Each ⟦...⟧ is the output of one such step, shown as "
             f"the {cfg.thought_tokens} tokens the LM head would read from it, with probabilities (␣ space, ↵ newline, "
             "⇥ tab); the real text goes on between them.")

    # ---- decoding: generate() prefills the prompt, then for every token runs its slot and K thought slots, each
    # appended to the KV cache (ponder.py's prefill and step); past block_size it refills from the recent half ------
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    # One generator for all samples: they differ from each other, and the same seed repeats the whole run.
    generator = torch.Generator(device).manual_seed(cfg.seed)
    samples, seconds = [], 0.0
    for i in range(cfg.num_samples):
        note(f"---------- sample {i + 1}/{cfg.num_samples}")
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a token may end inside a character
        sys.stdout.write(tok.decode(ids))               # the prompt first, so the continuation reads in context
        out, t0 = [], time.perf_counter()
        with autocast, torch.inference_mode():
            for token, thoughts in model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                                  exact_prefill=cfg.prefill == "exact", generator=generator):
                if cfg.show_thoughts:                   # thoughts: (1, K, d), the K steps before this token
                    # A thought is a final-norm output, exactly what the LM head reads, so the head applies as is.
                    probs = torch.softmax(model.lm_head(thoughts[0]).float(), dim=-1)       # (K, V)
                    top = torch.topk(probs, cfg.thought_tokens)
                    for p, t in zip(top.values.tolist(), top.indices.tolist()):
                        shown = " ".join(f"{readable(tok.token_bytes(j))} {q:.0%}" for q, j in zip(p, t))
                        sys.stdout.write(f"{dim}⟦{shown}⟧{reset}")
                out.append(token.item())
                sys.stdout.write(text.decode(tok.token_bytes(out[-1])))
                sys.stdout.flush()                      # text appears as it is made
        if kind == "cuda":
            torch.cuda.synchronize()                    # the clock must not stop before the GPU does
        seconds += time.perf_counter() - t0
        print(text.decode(b"", final=True), flush=True)        # a character cut off at the end becomes U+FFFD
        samples.append(out)
    n = sum(map(len, samples))                          # each token cost K + 1 forward steps
    note(f"---------- {n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s, {(K + 1) * n / seconds:.1f} forward "
         f"steps/s ({method}, K={K}, {device}, {dtype}, prompt prefill included)")
    return samples


if __name__ == "__main__":
    common.run_script(main, interrupted="\ninterrupted")
