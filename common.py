"""
The machinery behind train.py and sample.py, kept out of their way: command-line options from a dataclass, the
device, torchrun's ranks and stop signals, datasets, checkpoints, and the run folder (one run at a time, a log
that survives crashes, checkpoints never half-written). Nothing here is needed to understand the method.
"""

import argparse
import difflib
import errno
import json
import math
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from baselines import build
from ponder import EMB_SCALES, PonderConfig

REPO = Path(__file__).resolve().parent
DATA_DIR = REPO / "data"
MODEL_KEYS = [f.name for f in fields(PonderConfig) if f.name != "vocab_size"]
THOUGHT_KEYS = {"jacobi_min", "jacobi_max", "jacobi_eval", "grad_passes"}    # PonderLM-2's thought solve
SYSTEM_KEYS = {"device", "dtype", "compile"}        # describe this machine: never taken from a checkpoint


class Fail(Exception):
    """An error the user can fix: printed as one line, no traceback."""


# ---- options ----------------------------------------------------------------------------------------------------

def opt(default, help, gpu=None, neox=None, bare=None):
    """An option: its default, a one-line help, optionally other defaults on CUDA and for --arch=neox, and the value
    a bare --option (no =value) stands for (bool options: true)."""
    return field(default=default, metadata=dict(help=help, gpu=gpu, neox=neox, bare=bare))


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

        other = "".join(f" ({where}: {f.metadata[key]})" for key, where in [("gpu", "on CUDA"), ("neox", "neox")]
                        if f.metadata.get(key) is not None)
        shown = repr(f.default) if isinstance(f.default, str) else f.default
        help = f.metadata["help"] + other + f" [default: {shown}]"
        bare = True if f.type is bool else f.metadata.get("bare")       # a bare --flag means true
        flag = {} if bare is None else dict(nargs="?", const=bare)
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


def use_defaults(cfg, given, kind, keep=()):
    """Switch the options the user did not set (nor `keep`) to their defaults for `kind` (gpu or neox)."""
    for f in fields(cfg):
        if f.metadata.get(kind) is not None and f.name not in given and f.name not in keep:
            setattr(cfg, f.name, f.metadata[kind])


# ---- the machine ------------------------------------------------------------------------------------------------

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


# Dense bf16 peak FLOP/s by device name; the longest name contained in torch.cuda.get_device_name() wins (so an
# "H100 NVL" is not taken for an "H100"). None: no published figure (the A10G is an AWS variant without an NVIDIA
# datasheet), so no MFU rather than a wrong one.
PEAK_BF16 = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": None, "L4": 121e12, "A10": 125e12,
             "4090": 165e12}


def peak_flops(kind, dtype):
    if kind != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name()
    found = [k for k in PEAK_BF16 if k in name]
    return PEAK_BF16[max(found, key=len)] if found else None


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def note(text):
    """A line for the person watching, on stderr (dropped if stderr is closed: never mixed into the output)."""
    if sys.stderr is not None:
        print(text, file=sys.stderr, flush=True)


def run_script(main, interrupted):
    """Run a script's main() as a user expects: an error they can fix is one line (exit 1), Ctrl-C one line (exit
    130), a reader that goes away (`| head`) no error at all, and output that cannot be written (`> /dev/full`)
    one line. Every other OSError was turned into a Fail where it could happen."""
    try:
        main()
    except Fail as e:
        note(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        note(interrupted)
        sys.exit(130)
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())      # no second error when Python exits
        if isinstance(e, BrokenPipeError):
            sys.exit(0)
        note(f"error: cannot write the output ({e.strerror or e})")
        sys.exit(1)


class Console:
    """print, for rank 0 only. If standard output cannot be written (`> /dev/full`, a closed pipe), one warning goes
    to stderr and the run goes on: what it prints is also in log.jsonl."""

    def __init__(self, on):
        self.on = on

    def __call__(self, *args):
        if not self.on:
            return
        try:
            print(*args, flush=True)
        except OSError as e:
            self.on = False
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # no second error at exit
            if sys.stderr is not None:
                print(f"warning: cannot write to standard output ({e.strerror or e}); training goes on, and its "
                      "log is in log.jsonl", file=sys.stderr, flush=True)


def out_of_memory(error, micro_batch, run):
    """The one-line error for running out of memory (on a GPU, or in the CPU allocator, which raises a
    RuntimeError); any other error is returned as it is, to be raised again."""
    if isinstance(error, RuntimeError) and not isinstance(error, torch.cuda.OutOfMemoryError) \
            and "can't allocate memory" not in str(error):
        return error
    where = "GPU " if isinstance(error, torch.cuda.OutOfMemoryError) else ""
    kept = f"; {run.ckpt} is kept" if run.ckpt.exists() else ""
    return Fail(f"out of {where}memory at --micro_batch={micro_batch}: use a smaller one (--batch_tokens is kept by "
                f"accumulating more micro-steps) or a smaller model{kept}")


# ---- torchrun: ranks, the process group, and stopping every rank at the same step ------------------------------

def ranks():
    """(rank, local rank, world size, ddp?) from torchrun's environment; (0, 0, 1, False) without it."""
    if "RANK" not in os.environ:
        return 0, 0, 1, False
    try:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True
    except (KeyError, ValueError):
        raise Fail("RANK is set, but not LOCAL_RANK and WORLD_SIZE: start several processes with torchrun "
                   "(torchrun --standalone --nproc_per_node=N train.py), or unset RANK for one") from None


def join_process_group(kind, local_rank):
    """Join torchrun's process group (NCCL between GPUs, gloo on CPUs); returns this rank's device."""
    device = "cpu"
    if kind == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return device


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP (a closed terminal) ask the run to stop after the current step, with an
    evaluation and a checkpoint; a second signal, one second or more after the first, stops at once. (A scheduler
    that signals every process of a job reaches a torchrun worker twice, a few milliseconds apart: directly, and
    through torchrun, which passes on what it gets. That is one request.) The ranks must stop at the same step even
    if only one was signalled, so after every step they agree by an all-reduce of one number on the CPU (a gloo
    group: no GPU synchronisation). Call it after every step: True when the run should stop."""
    SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])

    def __init__(self, ddp):
        self.asked = None                         # when the first signal came
        self.group = dist.new_group(backend="gloo") if ddp else None
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, sig, frame):
        if self.asked is None:
            self.asked = time.monotonic()
        elif time.monotonic() - self.asked >= 1:
            raise KeyboardInterrupt

    def __call__(self):
        if self.group is None:
            return self.asked is not None
        flag = torch.tensor([float(self.asked is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() > 0

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_fit(data, mconf, weights):
    """The weights a run starts from ({where: checkpoint or None}) must have the dataset's vocabulary and tokenizer."""
    for where, ckpt in weights.items():
        if ckpt is not None and (ckpt["model_config"]["vocab_size"] != mconf.vocab_size
                                 or ckpt.get("tokenizer", data["tokenizer"]) != data["tokenizer"]):
            raise Fail(f"{where} has a vocabulary of {ckpt['model_config']['vocab_size']} ({ckpt.get('tokenizer')}), "
                       f"dataset {data['folder'].name!r} needs {mconf.vocab_size} ({data['tokenizer']}); use a dataset "
                       "made with its tokenizer, or another --out_dir")


def summary(cfg, model, data, accum, world, device, dtype, compile, resuming, step):
    """The three lines a run starts with: the model, the data and batch, the system."""
    return "\n".join([
        f"model: {cfg.method}, {model.num_params():,} parameters ({model.num_params(True):,} in blocks), "
        f"K={cfg.n_thoughts}, {cfg.n_layer}x{cfg.n_embd}{' ' + cfg.arch if cfg.arch != 'llama' else ''}, block "
        f"{cfg.block_size}, {model.flops_per_token() / 1e6:.1f} MFLOP per training token, "
        f"{model.flops_per_token(training=False) / 1e6:.1f} MFLOP per decoded token",
        f"data: {data['folder']} ({data['train_tokens']:,} train tokens, {data['tokenizer']}); "
        f"{cfg.batch_tokens:,} tokens per step = {cfg.micro_batch} seqs x {cfg.block_size} x {world} ranks x "
        f"{accum} accumulation",
        f"system: {device}, {dtype}, compile {'on' if compile else 'off'}"
        + (f"; resuming {resuming} at step {step}" if resuming else "")])


def batch_layout(cfg, given, world):
    """(micro_batch, accumulation steps, batch_tokens). What the user set is kept exactly (an error if the ranks
    cannot share it); a default micro_batch shrinks until it divides batch_tokens over the ranks, and a default
    batch_tokens becomes the nearest batch that the ranks can share, so any number of GPUs works."""
    T, micro, tokens = cfg.block_size, cfg.micro_batch, cfg.batch_tokens
    if "batch_tokens" not in given:
        per_rank = max(1, round(tokens / (T * world)))               # sequences per rank and step
        accum = math.ceil(per_rank / micro)
        micro = micro if "micro_batch" in given else math.ceil(per_rank / accum)
        tokens = micro * accum * T * world
    elif "micro_batch" not in given:
        while micro > 1 and tokens % (micro * T * world):
            micro -= 1
    if tokens % (micro * T * world):
        raise Fail(f"--batch_tokens={tokens} is not a multiple of micro_batch*block_size*ranks = "
                   f"{micro}*{T}*{world} = {micro * T * world}")
    return micro, tokens // (micro * T * world), tokens


# ---- datasets ---------------------------------------------------------------------------------------------------

def dataset_folder(name):
    """--dataset: a folder under data/ by name, or a path (relative to here or to the repository)."""
    candidates = [Path(name), DATA_DIR / name, REPO / name]
    return next((c for c in candidates if (c / "meta.json").exists()), DATA_DIR / Path(name).name)


def load_dataset(name, block_size, master, eval_windows=None):
    """A prepared dataset's meta.json, with "folder", "align" and "targets" filled in, after checking that its files
    are whole and their values fit the vocabulary, and that the val split can give eval_windows windows (more than
    it holds repeat some; far more is refused). The default stdlib corpus is prepared on first use (by rank 0;
    the others wait)."""
    if not name.strip():
        raise Fail("--dataset is empty: give a folder under data/ (e.g. stdlib) or a path")
    folder = dataset_folder(name)
    if name.rstrip("/") == "stdlib" and not (folder / "meta.json").exists() and master:
        from data.prepare import prepare_stdlib
        print("preparing the default corpus (the Python standard library, byte-level) ...")
        try:
            prepare_stdlib(folder)
        except FileExistsError:                   # another run prepared it meanwhile
            pass
        except (OSError, ValueError) as e:
            raise Fail(f"cannot prepare the default corpus in {folder}: {getattr(e, 'strerror', None) or e}") from None
    if dist.is_initialized():
        dist.barrier()
    if not (folder / "meta.json").exists():
        raise Fail(f"dataset {name!r} not found: no meta.json in {folder}; prepare it first, e.g. "
                   f"python data/prepare.py text PATH --name={folder.name}")
    damaged = f"{folder}/meta.json is damaged; prepare the dataset again"
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        raise Fail(damaged) from None
    meta = meta if isinstance(meta, dict) else {}
    meta.setdefault("align", 1)
    meta.setdefault("targets", False)
    for key, kind in [("tokenizer", str), ("vocab_size", int), ("train_tokens", int), ("val_tokens", int),
                      ("align", int), ("targets", bool)]:
        if not isinstance(meta.get(key), kind) or kind is int and (isinstance(meta[key], bool) or meta[key] < 1):
            what = "positive integer" if kind is int else kind.__name__
            raise Fail(f"{damaged} (its {key!r} is missing or not a {what})")
    meta["folder"] = folder
    V = meta["vocab_size"]
    for split in ("train", "val"):
        files = [(f"{split}.bin", np.uint16, 0, V - 1)]
        if meta["targets"]:
            files.append((f"{split}_targets.bin", np.int32, -1, V - 1))
        for file, dtype, low, high in files:
            path = folder / file
            size = path.stat().st_size if path.is_file() else 0
            n, rest = divmod(size, np.dtype(dtype).itemsize)
            if n != meta[f"{split}_tokens"] or rest:
                raise Fail(f"{path} holds {size:,} bytes, not the {meta[f'{split}_tokens']:,} values of "
                           f"{np.dtype(dtype).itemsize} bytes meta.json promises; prepare the dataset again")
            values = np.memmap(path, dtype=dtype, mode="r")
            for i in range(0, n, 1 << 26):        # a streaming pass: cheap, and never the whole file in memory
                chunk = values[i:i + (1 << 26)]
                if chunk.min() < low or chunk.max() > high:
                    raise Fail(f"{path} holds values outside [{low}, {high}], which the vocabulary of {V} does "
                               "not allow; prepare the dataset again")
        if windows(meta, split, block_size) < 1:
            align = meta["align"]
            where = f" starting at a multiple of align {align}" if align > 1 else ""
            raise Fail(f"{folder / split}.bin: its {meta[f'{split}_tokens']:,} tokens are fewer than block_size "
                       f"{block_size} needs for one window{where}; lower --block_size")
    distinct = windows(meta, "val", block_size)
    if eval_windows and eval_windows > 16 * distinct:
        raise Fail(f"--eval_windows={eval_windows} but the val split holds {distinct:,} windows of block_size "
                   f"{block_size}; use at most {distinct:,}")
    if eval_windows and eval_windows > distinct and master:
        print(f"note: the val split holds {distinct:,} windows of block_size {block_size}; "
              f"--eval_windows={eval_windows:,} repeats some")
    return meta


def windows(meta, split, T):
    """How many windows of T tokens a split offers. Window i starts at token i * align (align > 1: the dataset is
    made of sequences of that length, and a window must start where a sequence does). Without a targets file a
    window needs T + 1 tokens: its targets are its tokens shifted by one."""
    return (meta[f"{split}_tokens"] - T - (0 if meta["targets"] else 1)) // meta["align"] + 1


# ---- checkpoints ------------------------------------------------------------------------------------------------

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


def model_from(ckpt, path, config=None, method=None):
    """The model a checkpoint describes (or `config`, `method`), with its weights; a one-line Fail when they do not
    match."""
    try:
        model = build(method or ckpt.get("method", "ponderlm2"), config or PonderConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        why = " ".join(str(e).split())[:200]
        if config is None:
            raise Fail(f"{path} does not match the model it describes ({why})") from None
        raise Fail(f"the weights in {path} do not fit a {method} model with these settings ({why})") from None
    return model


def load_optimizer_state(optimizer, state, path):
    """Continue an optimizer from its saved state, but with the options it was made with now (weight decay, betas):
    a resumed run uses the options it is given, not those of its checkpoint."""
    now = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if not isinstance(state, dict):
        raise Fail(f"{path} has no optimizer state to continue from (it was not saved by a training run); use "
                   "--init_from=PATH to start a new run from its weights")
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise Fail(f"the optimizer state in {path} does not match the model ({e}); use another --out_dir") from None
    for group, options in zip(optimizer.param_groups, now):
        group.update(options)


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


def source_path(init_from):
    """--init_from=PATH: a checkpoint file, or a folder holding ckpt.pt (a run) or config.json (Hugging Face)."""
    path = Path(init_from)
    return path / "ckpt.pt" if path.is_dir() and not (path / "config.json").exists() else path


def load_source(path):
    """The weights to start a new run from, as a checkpoint-like dict: a train.py checkpoint, or a local copy of a
    Hugging Face GPT-NeoX checkpoint (a folder with config.json), mapped to this repository's names."""
    if not (path.is_dir() and (path / "config.json").exists()):
        return load_checkpoint(path)
    import pretrained
    try:
        config, weights = pretrained.load_neox(path)
        tokenizer = pretrained.tokenizer_name(path)
    except (ValueError, OSError) as e:
        raise Fail(f"cannot start from {path}: {e}") from None
    return dict(model=weights, model_config=config, method="ponderlm2", step=0, train_config={}, tokenizer=tokenizer)


def start_config(cfg, given, run, config_class):
    """Where this run starts: (the config, the checkpoint to resume or None, the source to start from or None).
    - The checkpoint in out_dir, if there is one (unless --init_from=scratch): its settings, except the options
      given now and those that describe this machine. The model must match.
    - --init_from=PATH, and nothing in out_dir yet: a new run from PATH's weights. The model settings come from the
      source, except those that only change how the same weights are used (K, the thought solve, block_size: the
      rotary tables are derived, and the method); the shape must stay. The embedding scale the source was trained
      with is kept unless --emb_scale is given.
    - Otherwise a new run from scratch."""
    from_path = cfg.init_from not in ("auto", "scratch", "resume")
    resume = cfg.eval_only or cfg.init_from == "resume" or cfg.init_from != "scratch" and run.ckpt.exists()
    if resume:
        if not run.ckpt.exists():
            raise Fail(f"no checkpoint at {run.ckpt} to resume; train one first (python train.py "
                       f"--out_dir={run.path})")
        ckpt = load_checkpoint(run.ckpt)
        started_from = str(ckpt["train_config"].get("init_from"))
        if from_path and Path(started_from).resolve() != Path(cfg.init_from).resolve():
            raise Fail(f"{run.ckpt} holds a run that did not start from {cfg.init_from}; choose another --out_dir "
                       "for the new run (or drop --init_from to resume this one)")
        model = {**ckpt["model_config"], "method": ckpt.get("method", "ponderlm2")}
        for key, old in model.items():
            if key in given and key not in THOUGHT_KEYS and getattr(cfg, key) != old:
                raise Fail(f"{run.ckpt} has {key}={old}, not {getattr(cfg, key)}; drop --{key} to resume it, or "
                           "train the new model in another --out_dir")
        names = {f.name for f in fields(config_class)} - SYSTEM_KEYS
        saved = {k: v for k, v in {**ckpt["train_config"], **model}.items() if k in names}
        cfg = config_class(**{**saved, **{k: getattr(cfg, k) for k in given | SYSTEM_KEYS}})
        if not from_path:
            cfg.init_from = "resume"
        return cfg, ckpt, None
    if not from_path:
        if cfg.arch == "neox":
            use_defaults(cfg, given, "neox")
        return cfg, None, None
    path = source_path(cfg.init_from)
    src = load_source(path)
    model = {**src["model_config"], "method": src.get("method", "ponderlm2")}
    free = THOUGHT_KEYS | {"n_thoughts", "block_size", "method", "emb_scale"}
    for key, old in model.items():
        if key in given and key not in free and getattr(cfg, key) != old:
            raise Fail(f"cannot start from {path}: it has {key}={old}, not {getattr(cfg, key)}, and its weights "
                       f"would not fit; drop --{key}")
    old = build(model["method"], PonderConfig(**src["model_config"]))
    scale = next(name for name, f in EMB_SCALES.items() if f(old.config.n_embd) == old.emb_scale)
    taken = {k: v for k, v in model.items() if k not in given and k in {f.name for f in fields(config_class)}}
    taken["emb_scale"] = cfg.emb_scale if "emb_scale" in given else scale
    cfg = config_class(**{**vars(cfg), **taken})
    if cfg.arch == "neox":
        use_defaults(cfg, given, "neox", keep=taken)
    return cfg, None, src


# ---- the run folder: one run at a time, a log that survives crashes, checkpoints never half-written ------------

class RunDir:
    """out_dir, as rank 0 sees it: ckpt.pt, log.jsonl, and a lock held for the whole run, so that a second run
    aimed at the same folder stops at once. The OS drops the lock when a process dies, even by kill -9."""

    def __init__(self, path):
        if not str(path).strip():
            raise Fail("--out_dir is empty (an unset shell variable?): name the folder for this run")
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
        if self.log.exists() and not self.log.is_file():
            raise Fail(f"{self.log} is not a file; move it away so the run can write its log there")
        for tmp in self.path.glob("*.tmp"):       # left by a process killed while saving (we hold the lock now)
            pid = re.match(r".*\.(\d+)(-[0-9a-f]+)?\.tmp$", tmp.name)
            if pid and not alive(int(pid.group(1))):
                tmp.unlink(missing_ok=True)

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
        for raw in self.log.read_bytes().splitlines() if self.log.is_file() else []:
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


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                               # it exists, but belongs to someone else
    return True


def lock_file(f):
    if os.name == "nt":
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
