"""
What train.py and sample.py share: command-line options from a dataclass, the device, checkpoints, run folders.
"""

import argparse
import difflib
import errno
import json
import math
import os
import sys
import secrets
import time
from dataclasses import field, fields
from pathlib import Path

import torch

from baselines import build
from ponder import PonderConfig


class Fail(Exception):
    """An error the user can fix: printed as one line, no traceback."""


def opt(default, help, gpu=None):
    """An option: its default, a one-line help, and optionally another default on CUDA."""
    return field(default=default, metadata=dict(help=help, gpu=gpu))


# Options of nanoGPT and similar trainers that have another name here (or no exact equivalent).
ALIASES = {"learning_rate": "lr", "min_lr": "min_lr_ratio (a fraction of --lr)", "batch_size": "micro_batch",
           "gradient_accumulation_steps": "batch_tokens (accumulation is derived from it)",
           "eval_iters": "eval_windows", "eval_batches": "eval_windows", "n_heads": "n_head", "n_layers": "n_layer",
           "d_model": "n_embd", "n_embed": "n_embd", "seq_len": "block_size", "context_length": "block_size",
           "decay_lr": "min_lr_ratio (1 keeps the rate constant)", "max_tokens": "max_new_tokens",
           "prompt": "start", "wandb_log": None, "dropout": None, "bias": None}


def parse_value(kind, text):
    s = text.strip().lower()
    if kind is bool:
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if kind is int:
        try:
            return int(s)                    # accepts 10_000 too
        except ValueError:
            v = float(s)                     # accepts 1e4
            if not math.isfinite(v) or v != int(v):
                raise ValueError from None
            return int(v)
    if kind is float:
        v = float(s)
        if not math.isfinite(v):             # nan and inf are never a sensible setting
            raise ValueError
        return v
    return text


def parse_options(config_class, argv=None, description=""):
    """Command-line options from a dataclass of opt() fields: --name=value or --name value, typed like the field.
    Returns the config and the names of the options given. Unknown or ill-typed options exit with one line."""
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "train.py"
    p = argparse.ArgumentParser(usage=f"python {script} [--option=value ...]   (--help lists them)",
                                description=description + " Options take --name=value or --name value.",
                                allow_abbrev=False)
    names = [f.name for f in fields(config_class)]
    for f in fields(config_class):
        def convert(text, kind=f.type):
            try:
                return parse_value(kind, text)
            except ValueError:
                what = "a finite number" if kind is float else kind.__name__
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

        gpu = f.metadata.get("gpu")
        shown = repr(f.default) if isinstance(f.default, str) else f.default
        help = f.metadata["help"] + (f" (on CUDA: {gpu})" if gpu is not None else "") + f" [default: {shown}]"
        flag = dict(nargs="?", const=True) if f.type is bool else {}     # a bare --flag means true
        p.add_argument(f"--{f.name}", type=convert, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                       help=help.replace("%", "%%"), **flag)
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        name = u.split("=")[0].lstrip("-")
        if name in ALIASES:
            hint = ALIASES[name] if ALIASES[name] and ALIASES[name].split()[0] in names else None
            p.error(f"unknown option --{name}" + (f"; did you mean --{hint}?" if hint else " (no such setting here)"))
        close = difflib.get_close_matches(name, names, n=1)
        p.error(f"unknown option {u.split('=')[0]!r}" + (f"; did you mean --{close[0]}?" if close else ""))
    given = vars(args)
    return config_class(**given), set(given)


def pick_device(device, dtype):
    """Resolve --device and --dtype ('auto' or explicit) to (device, its kind, dtype name), with clear errors.
    bf16 only where the GPU computes it natively (Ampere and newer); older GPUs emulate it slowly."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise Fail(f"--device={device}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise Fail(f"--device={device} but this machine has no {kind.upper()} device; use --device=cpu")
    if dtype == "auto":
        native = kind == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = "bfloat16" if native else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise Fail(f"--dtype={dtype}: use auto, bfloat16 or float32")
    return device, kind, dtype


CKPT_KEYS = {"model": dict, "model_config": dict, "train_config": dict, "step": int}


def load_checkpoint(path):
    """A checkpoint written by train.py, read safely (tensors and plain values only), or a one-line Fail."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or use another --out_dir")
    bad = [k for k, kind in CKPT_KEYS.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind)]
    if bad:
        raise Fail(f"{path} is not a checkpoint of train.py (no valid {bad[0]!r}); delete it or use another --out_dir")
    return ckpt


def model_from(ckpt, path, config=None):
    """The model a checkpoint describes (or `config`), with its weights; a one-line Fail when they do not match."""
    try:
        model = build(ckpt.get("method", "ponderlm2"), config or PonderConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise Fail(f"{path} does not match the model it describes ({str(e).splitlines()[0][:200]})") from None
    return model


# ---- the run folder: one run at a time, a log that survives crashes, checkpoints never half-written ------------

def save_checkpoint(path, state):
    """Write to a temporary file of this process, flush it to disk, then rename: a crash or a full disk leaves the
    previous checkpoint intact."""
    tmp = Path(f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp")       # this process's own, with the umask's mode
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):       # make the rename itself durable (POSIX)
            dir_fd = os.open(Path(path).parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


class RunDir:
    """out_dir, as rank 0 sees it: ckpt.pt, log.jsonl, and a lock held for the whole run, so that a second run
    aimed at the same folder stops at once. The OS drops the lock when a process dies, even by kill -9."""

    def __init__(self, path):
        self.path, self.lock, self.made = Path(path), None, False
        self.ckpt, self.log = self.path / "ckpt.pt", self.path / "log.jsonl"

    def claim(self):
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / "lock", "a+", encoding="utf-8")
        except OSError as e:
            raise Fail(f"cannot use --out_dir={self.path}: {e.strerror or e}; choose a writable folder") from None
        try:
            lock_file(self.lock)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):   # no locks here (some network disks)
                print(f"warning: cannot lock {self.path} ({e.strerror}): make sure no other run uses it")
            else:
                self.lock.seek(0)
                owner = self.lock.read().strip() or "unknown"
                self.lock.close()
                self.lock = None
                raise Fail(f"{self.path} is in use by another run (pid {owner}); wait for it to end, stop it, or "
                           "choose another --out_dir") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(str(os.getpid()))
        self.lock.flush()

    def release(self):
        """Drop the lock (closing the file does it). A folder this run made and left empty is removed again."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None
            if self.made and [p.name for p in self.path.iterdir()] == ["lock"]:
                (self.path / "lock").unlink()
                self.path.rmdir()

    def set_aside(self):
        """Starting over where a run exists: keep the old one in previous-<time>/, never delete it."""
        old = self.path / time.strftime("previous-%Y%m%d-%H%M%S")
        old.mkdir()
        for path in (self.ckpt, self.log):
            if path.exists():
                os.replace(path, old / path.name)
        return old

    def entries(self):
        """The log's entries; lines cut short by a crash, not UTF-8 or not JSON objects with a step are skipped."""
        out = []
        for raw in self.log.read_bytes().splitlines() if self.log.exists() else []:
            try:
                entry = json.loads(raw.decode("utf-8"))
            except ValueError:                    # UnicodeDecodeError is a ValueError
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int):
                out.append(entry)
        return out

    def rewind(self, step):
        """Keep the log's entries up to `step` (a resumed run redoes what came after its checkpoint), and drop
        damaged lines. The new log is written beside the old one and renamed over it: never half a log."""
        kept = [json.dumps(e) + "\n" for e in self.entries() if e["step"] <= step]
        if self.log.exists() and "".join(kept).encode() == self.log.read_bytes():
            return
        tmp = self.log.with_name(f"log.jsonl.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.log)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self.cannot_write(e) from None

    def record(self, entry):
        try:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:
            raise self.cannot_write(e) from None

    def cannot_write(self, e):
        return Fail(f"cannot write {self.log}: {e.strerror or e}; free some space and run the same command again")

    def save(self, state):
        try:
            save_checkpoint(self.ckpt, state)
        except (OSError, RuntimeError) as e:      # torch.save reports a failed write as a RuntimeError
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
            kept = f"{self.ckpt} still holds step {self.saved_step()}" if self.ckpt.exists() else "nothing was saved"
            raise Fail(f"cannot save {self.ckpt} ({why}); {kept}. Is the disk full? Free some space and run the "
                       "same command again") from None

    def saved_step(self):
        return load_checkpoint(self.ckpt)["step"]


def lock_file(f):
    if os.name == "nt":
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
