"""
Train PonderLM-2, a vanilla model (K = 0), or one of the paper's baselines, on tokenized .bin files.

    python train.py                                              # byte-level stdlib corpus, K = 1, any device
    python train.py --n_thoughts=0 --out_dir=out-vanilla         # the vanilla model of the same size
    python train.py --method=pause --n_thoughts=3 --out_dir=out-pause     # a baseline: pause, loop or ponderlm
    torchrun --standalone --nproc_per_node=8 train.py --dataset=tinystories      # one GPU node
    python train.py --help                                       # every option, with its default

The batch is given in tokens per optimizer step over all ranks; gradient accumulation is derived. Running the same
command again continues the run in out_dir. Ctrl-C or SIGTERM (kill, a scheduler, torchrun) finishes the step,
evaluates, saves and exits; a second one stops at once. Multi-node: torchrun's own flags on each node.
"""

import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import METHODS, build
from common import Fail, RunDir, load_checkpoint, model_from, opt, parse_options, pick_device
from ponder import EMB_SCALES, PonderConfig

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass
class TrainConfig:
    # data, output, evaluation
    dataset: str = opt("stdlib", "folder under data/ (or a path) with train.bin, val.bin, meta.json")
    out_dir: str = opt("out", "where ckpt.pt and log.jsonl go; one run at a time")
    init_from: str = opt("auto", "auto (resume if out_dir has a checkpoint), scratch, resume, or the path of another "
                                 "run's checkpoint (or folder) to start a new run from its weights")
    eval_interval: int = opt(100, "evaluate and checkpoint every this many steps", gpu=250)
    eval_windows: int = opt(160, "fixed validation windows of block_size tokens per evaluation, split over ranks",
                            gpu=1280)
    eval_exact: bool = opt(False, "also report val loss with exact thoughts (Jacobi until fixed); slow")
    eval_only: bool = opt(False, "evaluate the checkpoint in out_dir and exit")
    log_interval: int = opt(10, "print a training line every this many steps")
    # model (PonderConfig, and the method that uses it)
    method: str = opt("ponderlm2", "ponderlm2 (latent thoughts), or a baseline: pause, loop, ponderlm (K = n_thoughts)")
    n_layer: int = opt(4, "transformer blocks", gpu=6)
    n_head: int = opt(4, "attention heads", gpu=6)
    n_embd: int = opt(128, "model width d", gpu=384)
    block_size: int = opt(128, "tokens per sequence (a sequence has (K+1) times as many slots)", gpu=256)
    n_thoughts: int = opt(1, "K: latent thoughts per token (pause slots, extra loops or passes); 0 is vanilla")
    jacobi_min: int = opt(2, "fewest Jacobi passes J in a training step (one J per optimizer step)")
    jacobi_max: int = opt(3, "most Jacobi passes J in a training step")
    jacobi_eval: int = opt(3, "Jacobi passes J at evaluation")
    grad_passes: int = opt(0, "backpropagate through only the last n passes of the thought solve (0: all)")
    emb_scale: str = opt("auto", "token-embedding multiplier: auto (the method's own if K > 0, else 1), "
                                 + ", ".join(EMB_SCALES))
    rope_theta: float = opt(10000.0, "rotary base")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    # optimization
    batch_tokens: int = opt(1024, "tokens per optimizer step over all ranks (the default is fitted to the ranks)",
                            gpu=32768)
    micro_batch: int = opt(8, "sequences per forward pass on each rank", gpu=64)
    max_iters: int = opt(600, "optimizer steps to train for", gpu=1500)
    lr: float = opt(3e-3, "peak learning rate", gpu=1.5e-3)
    min_lr_ratio: float = opt(0.1, "the cosine decays to this fraction of lr")
    warmup_iters: int = opt(30, "linear warmup steps", gpu=100)
    lr_decay_iters: int = opt(0, "length of the cosine (0: max_iters of the run's first start; kept on resume)")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    # system
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (bfloat16 on GPUs that have it natively, else float32), bfloat16 or float32")
    compile: str = opt("auto", "torch.compile each block: auto (on for CUDA on Linux), true or false")
    seed: int = opt(1337, "seeds the init, the batches and the J draws")


MODEL_KEYS = [f.name for f in fields(PonderConfig) if f.name != "vocab_size"]
# PonderLM-2's thought solve: options of that method only, and the model options a resumed run may change
THOUGHT_KEYS = {"jacobi_min", "jacobi_max", "jacobi_eval", "grad_passes"}
SYSTEM_KEYS = {"device", "dtype", "compile"}                     # describe this machine: never taken from a checkpoint


# ---- options ----------------------------------------------------------------------------------------------------

def check_config(cfg, given):
    """Every option, before any work (floats are already known to be finite)."""
    for name in ("eval_interval", "eval_windows", "log_interval", "batch_tokens", "micro_batch", "max_iters"):
        if getattr(cfg, name) < 1:
            raise Fail(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise Fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**63:
        raise Fail(f"--seed must be within [0, 2**63), got {cfg.seed}")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise Fail(f"--lr must be > 0 and --min_lr_ratio within [0, 1], got {cfg.lr} and {cfg.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise Fail(f"--{name} must be within [0, 1), got {getattr(cfg, name)}")
    choices = dict(method=tuple(METHODS), compile=("auto", "true", "false"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise Fail(f"--{name}={getattr(cfg, name)}: use {', '.join(allowed)}")
    if cfg.init_from not in ("auto", "scratch", "resume") and not source_path(cfg.init_from).exists():
        raise Fail(f"--init_from={cfg.init_from}: no checkpoint there; use auto, scratch, resume, or the path of a "
                   "train.py checkpoint (or of its out_dir)")
    if cfg.method != "ponderlm2" and (unused := sorted(given & THOUGHT_KEYS)):
        raise Fail(f"--{unused[0]} belongs to PonderLM-2's thought solve; {cfg.method} is exact in one forward")
    try:
        return PonderConfig(vocab_size=1, **{k: getattr(cfg, k) for k in MODEL_KEYS})
    except ValueError as e:
        raise Fail(str(e)) from None


def resolve_system(cfg, given):
    """Device, dtype and compile, and the CUDA defaults for the options the user did not set."""
    device, kind, dtype = pick_device(cfg.device, cfg.dtype)
    if kind == "cuda":
        for f in fields(TrainConfig):
            if f.metadata["gpu"] is not None and f.name not in given:
                setattr(cfg, f.name, f.metadata["gpu"])
    compile = cfg.compile.lower()
    compile = kind == "cuda" and platform.system() == "Linux" if compile == "auto" else compile == "true"
    return device, kind, dtype, compile


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


# ---- data -------------------------------------------------------------------------------------------------------

def load_meta(cfg, master):
    """The dataset's meta.json; the default stdlib corpus is prepared on first use (by rank 0, others wait)."""
    folder = Path(cfg.dataset) if os.sep in cfg.dataset or "/" in cfg.dataset else DATA_DIR / cfg.dataset
    if cfg.dataset == "stdlib" and not (folder / "meta.json").exists() and master:
        from data.prepare import prepare_stdlib
        print("preparing the default corpus (the Python standard library, byte-level) ...")
        try:
            prepare_stdlib(folder)
        except ValueError:                        # another run prepared it meanwhile
            pass
        except OSError as e:
            raise Fail(f"cannot prepare the default corpus in {folder}: {e.strerror or e}") from None
    if dist.is_initialized():
        dist.barrier()
    if not (folder / "meta.json").exists():
        raise Fail(f"dataset {cfg.dataset!r} not found: {folder}/meta.json is missing; prepare it first, e.g. "
                   f"python data/prepare.py text PATH --name={folder.name}")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        sizes = {split: int(meta[f"{split}_tokens"]) for split in ("train", "val")}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Fail(f"{folder}/meta.json is damaged: prepare the dataset again") from None
    align, targets = meta.get("align", 1), meta.get("targets", False)
    if not isinstance(align, int) or align < 1 or not isinstance(targets, bool):
        raise Fail(f"{folder}/meta.json is damaged (align must be a positive integer, targets true or false): "
                   "prepare the dataset again")
    meta["folder"], meta["align"], meta["targets"] = folder, align, targets
    for split, expected in sizes.items():
        for path, itemsize in [(folder / f"{split}.bin", 2)] + [(folder / f"{split}_targets.bin", 4)] * targets:
            n = path.stat().st_size // itemsize if path.exists() else 0
            if n != expected:
                raise Fail(f"{path} holds {n:,} tokens but meta.json says {expected:,}: prepare the dataset again")
        if windows(meta, split, cfg.block_size) < 1:
            raise Fail(f"{folder / split}.bin: its {expected:,} tokens are fewer than block_size {cfg.block_size} "
                       f"needs for one window{f' starting at a multiple of align {align}' if align > 1 else ''}; "
                       "lower --block_size")
    return meta


def windows(meta, split, T):
    """How many windows of T tokens a split offers. Window i starts at token i * align (align > 1: the dataset is
    made of sequences of that length, and a window must start where a sequence does). Without a targets file a
    window needs T + 1 tokens: its targets are its tokens shifted by one."""
    return (meta[f"{split}_tokens"] - T - (0 if meta["targets"] else 1)) // meta["align"] + 1


def get_batch(meta, split, offsets, T, device):
    """Inputs and targets (B, T) of the windows starting at offsets. The targets are the next tokens, or, where the
    dataset has a targets file, its values at the same positions (-1: not scored)."""
    data = np.memmap(meta["folder"] / f"{split}.bin", dtype=np.uint16, mode="r")   # a fresh memmap per call
    if meta["targets"]:
        targets = np.memmap(meta["folder"] / f"{split}_targets.bin", dtype=np.int32, mode="r")
        x = np.stack([data[o:o + T] for o in offsets]).astype(np.int64)
        y = np.stack([targets[o:o + T] for o in offsets]).astype(np.int64)
    else:
        xy = np.stack([data[o:o + T + 1] for o in offsets]).astype(np.int64)
        x, y = xy[:, :-1], xy[:, 1:]
    xy = torch.from_numpy(np.stack([x, y]))
    if device.startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[0], xy[1]


def train_offsets(meta, cfg, step, micro):
    """Random windows drawn from (seed, step, global micro-step): a resumed run continues, never replays."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    return rng.integers(0, windows(meta, "train", cfg.block_size), size=cfg.micro_batch) * meta["align"]


def jacobi_for(cfg, step):
    """J for this step: one draw per optimizer step, shared by its micro-steps and ranks (see README)."""
    return int(np.random.default_rng([cfg.seed, step, 1 << 30]).integers(cfg.jacobi_min, cfg.jacobi_max + 1))


def lr_at(cfg, step):
    """Linear warmup to lr, then a cosine down to lr*min_lr_ratio at lr_decay_iters, then that floor."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    decay = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, meta, cfg, device, autocast, rank, world, jacobi=None):
    """Mean loss over eval_windows fixed, evenly spaced validation windows (the same for any number of ranks or
    micro-batch size), the forwards split over ranks, then all-reduced. Each forward takes the same number of
    windows (the largest divisor of eval_windows up to micro_batch), so a compiled model sees one shape."""
    last = windows(meta, "val", cfg.block_size) - 1
    offsets = np.linspace(0, last, cfg.eval_windows).astype(np.int64) * meta["align"]
    size = max(b for b in range(1, cfg.micro_batch + 1) if cfg.eval_windows % b == 0)
    batches = np.split(offsets, cfg.eval_windows // size)
    model.eval()
    total = torch.zeros((), device=device)
    for batch in batches[rank::world]:
        x, y = get_batch(meta, "val", batch, cfg.block_size, device)
        with autocast:
            _, loss = model(x, y, jacobi=jacobi)
        total += loss.float() * len(batch)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / len(offsets)


# ---- stopping cleanly -------------------------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM ask the run to stop after the current step, with an evaluation and a checkpoint;
    a second signal, one second or more after the first, stops at once. (A scheduler that signals every process of
    a job reaches a torchrun worker twice, a few milliseconds apart: directly, and through torchrun, which passes on
    what it gets. That is one request.) The ranks must stop at the same step even if only one was signalled, so
    after every step they agree by an all-reduce of one number on the CPU (a gloo group: no GPU synchronisation)."""

    def __init__(self, ddp):
        self.asked = None                         # when the first signal came
        self.group = dist.new_group(backend="gloo") if ddp else None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

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


# ---- the run ----------------------------------------------------------------------------------------------------

def train_step(train_model, model, optimizer, lr, batches, J, grad_clip, autocast):
    """One optimizer step over this rank's micro-batches, all with the same J. Under DDP the gradients are
    synchronised (averaged over ranks) on the last micro-step only. Returns the mean loss as a device tensor."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    ddp = isinstance(train_model, DDP)
    loss_sum = 0
    for i, (x, y) in enumerate(batches):
        if ddp:
            train_model.require_backward_grad_sync = i == len(batches) - 1
        with autocast:
            _, loss = train_model(x, y, jacobi=J)
        (loss / len(batches)).backward()          # the mean over micro-steps, as one big batch would give
        loss_sum = loss_sum + loss.detach() / len(batches)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def source_path(init_from):
    """--init_from=PATH: a checkpoint file, or a run folder holding ckpt.pt."""
    path = Path(init_from)
    return path / "ckpt.pt" if path.is_dir() else path


def source_config(cfg, given, path):
    """A new run from another run's weights: the model settings come from the source, except those that only change
    how the same weights are used (K, the thought solve, block_size: the rotary tables are derived, the method);
    the shape must stay. The embedding scale the source was trained with is kept unless --emb_scale is given."""
    src = load_checkpoint(path)
    model = {**src["model_config"], "method": src.get("method", "ponderlm2")}
    free = THOUGHT_KEYS | {"n_thoughts", "block_size", "method", "emb_scale"}
    for key, old in model.items():
        if key in given and key not in free and getattr(cfg, key) != old:
            raise Fail(f"cannot start from {path}: it has {key}={old}, not {getattr(cfg, key)}, and its weights "
                       f"would not fit; drop --{key}")
    old_model = model_from(src, path)
    scale = next(name for name, f in EMB_SCALES.items() if f(old_model.config.n_embd) == old_model.emb_scale)
    keep = {k: v for k, v in model.items() if k not in given and k in {f.name for f in fields(TrainConfig)}}
    cfg = TrainConfig(**{**vars(cfg), **keep, **({} if "emb_scale" in given else {"emb_scale": scale})})
    return cfg, src


def resume_config(cfg, given, run):
    """The checkpoint to continue, if any, and the config: the checkpoint's settings, except the options given
    now and those that describe this machine. The model must match. With --init_from=PATH and no checkpoint in
    out_dir yet: the config of a new run from PATH's weights, and None."""
    from_path = cfg.init_from not in ("auto", "scratch", "resume")
    if from_path and not run.ckpt.exists() and not cfg.eval_only:
        return source_config(cfg, given, source_path(cfg.init_from))[0], None
    resume = cfg.init_from == "resume" or cfg.init_from != "scratch" and run.ckpt.exists() or cfg.eval_only
    if not resume:
        return cfg, None
    if not run.ckpt.exists():
        raise Fail(f"no checkpoint at {run.ckpt} to resume; train one first (python train.py --out_dir={run.path})")
    ckpt = load_checkpoint(run.ckpt)
    if from_path and ckpt["train_config"].get("init_from") != cfg.init_from:
        raise Fail(f"{run.ckpt} holds a run that did not start from {cfg.init_from}; choose another --out_dir for "
                   "the new run (or drop --init_from to resume this one)")
    model = {**ckpt["model_config"], "method": ckpt.get("method", "ponderlm2")}
    for key, old in model.items():
        if key in given and key not in THOUGHT_KEYS and getattr(cfg, key) != old:
            raise Fail(f"{run.ckpt} has {key}={old}, not {getattr(cfg, key)}; drop --{key} to resume it, or train "
                       f"the new model in another --out_dir")
    saved = {k: v for k, v in {**ckpt["train_config"], "method": model["method"]}.items()
             if k in {f.name for f in fields(TrainConfig)} - SYSTEM_KEYS}
    cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given | SYSTEM_KEYS}})
    if not from_path:
        cfg.init_from = "resume"
    return cfg, ckpt


def optimizer_settings(cfg, kind):
    """Each param group's options (matrices with weight decay, then the rest), set when the optimizer is made and
    again after a resume, so that a resumed run uses the options it was given, not those of its checkpoint."""
    common = dict(betas=(cfg.beta1, cfg.beta2), fused=kind == "cuda")
    return [dict(weight_decay=cfg.weight_decay, **common), dict(weight_decay=0.0, **common)]


def make_optimizer(model, cfg, kind, ckpt):
    params = [[p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2]]
    optimizer = torch.optim.AdamW([dict(params=p, **s) for p, s in zip(params, optimizer_settings(cfg, kind))],
                                  lr=cfg.lr)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise Fail(f"the optimizer state in the checkpoint does not match the model ({e}); use another "
                       "--out_dir") from None
        for group, settings in zip(optimizer.param_groups, optimizer_settings(cfg, kind)):
            group.update(settings)
    return optimizer


# Dense bf16 peak FLOP/s by device name; the first name contained in torch.cuda.get_device_name() wins. None:
# no published figure (the A10G is an AWS variant without an NVIDIA datasheet), so no MFU rather than a wrong one.
PEAK_BF16 = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": None, "L4": 121e12, "A10": 125e12,
             "4090": 165e12}


def peak_flops(kind, dtype):
    if kind != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv=None):
    cfg, given = parse_options(TrainConfig, argv, "Train PonderLM-2 or a baseline.")
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    log = print if rank == 0 else (lambda *a, **k: None)
    device, kind, dtype, compile = resolve_system(cfg, given)
    check_config(cfg, given)
    run = RunDir(cfg.out_dir)
    if rank == 0:                                 # rank 0 owns out_dir
        run.claim()
    try:
        if ddp:
            if kind == "cuda":
                device = f"cuda:{local_rank}"
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        return train(cfg, given, run, device, kind, dtype, compile, rank, local_rank, world, log)
    except torch.cuda.OutOfMemoryError:
        kept = f"; {run.ckpt} is kept" if run.ckpt.exists() else ""
        raise Fail(f"out of GPU memory at --micro_batch={cfg.micro_batch}: use a smaller one (--batch_tokens is kept "
                   f"by accumulating more micro-steps) or a smaller model{kept}")
    finally:
        run.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, given, run, device, kind, dtype, compile, rank, local_rank, world, log):
    master, ddp = rank == 0, dist.is_initialized()
    cfg, ckpt = resume_config(cfg, given, run)
    mconf = check_config(cfg, given)
    if ckpt is None and master and (run.ckpt.exists() or run.log.exists()):
        log(f"starting over: the previous run's files went to {run.set_aside()}")
    if ckpt is None and not cfg.lr_decay_iters:
        cfg.lr_decay_iters = cfg.max_iters        # the schedule's length, kept when a later run extends max_iters
    meta = load_meta(cfg, master)
    mconf.vocab_size = 64 * math.ceil(meta["vocab_size"] / 64)     # padded to a multiple of 64 for fast matmuls
    if ckpt is not None and ckpt["model_config"]["vocab_size"] != mconf.vocab_size:
        raise Fail(f"{run.ckpt} has a vocabulary of {ckpt['model_config']['vocab_size']}, dataset {cfg.dataset!r} "
                   f"needs {mconf.vocab_size} ({meta['tokenizer']}); use its dataset, or another --out_dir")
    cfg.micro_batch, accum, cfg.batch_tokens = batch_layout(cfg, given, world)

    torch.manual_seed(cfg.seed)
    model = model_from(ckpt, run.ckpt, mconf) if ckpt else build(cfg.method, mconf)
    if ckpt is None and cfg.init_from not in ("auto", "scratch", "resume"):     # a new run from another's weights
        path = source_path(cfg.init_from)
        src = load_checkpoint(path)
        if src["model_config"]["vocab_size"] != mconf.vocab_size:
            raise Fail(f"cannot start from {path}: its vocabulary has {src['model_config']['vocab_size']} entries, "
                       f"dataset {cfg.dataset!r} needs {mconf.vocab_size}; use a dataset made with its tokenizer")
        try:
            model.load_state_dict(src["model"])
        except RuntimeError as e:
            raise Fail(f"the weights of {path} do not fit a {cfg.method} model ({str(e).splitlines()[1].strip()[:150]})"
                       ) from None
        log(f"starting from the weights of {path} (step {src['step']} of that run, K={src['model_config']['n_thoughts']}"
            f"); the optimizer state and the schedule start anew")
    model.to(device)
    optimizer = make_optimizer(model, cfg, kind, ckpt)
    step = ckpt["step"] if ckpt else 0
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if compile:   # each block on its own: one small static graph per slot count and grad mode, whatever J is
        torch._dynamo.config.cache_size_limit = 64
        for block in model.blocks:
            block.compile(dynamic=False)
    train_model = DDP(model, device_ids=[local_rank] if kind == "cuda" else None) if ddp else model
    # `model` stays the plain module: it is what we save and evaluate (on every rank, never through DDP)

    def run_eval():
        val = {"val_loss": evaluate(model, meta, cfg, device, autocast, rank, world)}
        if cfg.eval_exact and cfg.n_thoughts and cfg.method == "ponderlm2":
            val["val_loss_exact"] = evaluate(model, meta, cfg, device, autocast, rank, world, jacobi="exact")
        if not all(math.isfinite(v) for v in val.values()):
            diverged(f"validation loss is {val} at step {step}")
        return val

    def diverged(what):
        kept = f"the last good checkpoint stays in {run.ckpt}" if run.ckpt.exists() else "no checkpoint was saved"
        raise Fail(f"{what}: training diverged; {kept} (try a lower --lr)")

    def evaluate_and_save(save=True):
        val = run_eval()
        save = save and not cfg.eval_only
        if master:
            run.record({"step": step, **({"eval_only": True} if cfg.eval_only else {}), **val})
            if save:
                run.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_config=asdict(mconf),
                              train_config=asdict(cfg), method=cfg.method, step=step, tokenizer=meta["tokenizer"],
                              **val))
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
            + (f"; saved {run.ckpt}" if save else ""))
        return val

    flops_tok, peak = model.flops_per_token(), peak_flops(kind, dtype)
    log(f"model: {cfg.method}, {model.num_params():,} parameters ({model.num_params(True):,} in blocks), "
        f"K={cfg.n_thoughts}, {cfg.n_layer}x{cfg.n_embd}, block {cfg.block_size}, {flops_tok / 1e6:.1f} MFLOP per "
        f"training token, {model.flops_per_token(training=False) / 1e6:.1f} MFLOP per decoded token")
    log(f"data: {meta['folder']} ({meta['train_tokens']:,} train tokens, {meta['tokenizer']}); {cfg.batch_tokens:,} "
        f"tokens per step = {cfg.micro_batch} seqs x {cfg.block_size} x {world} ranks x {accum} accumulation")
    log(f"system: {device}, {dtype}, compile {'on' if compile else 'off'}"
        + (f"; resuming {run.ckpt} at step {step}" if ckpt else ""))
    if cfg.eval_only:
        return evaluate_and_save()
    if master and ckpt:
        run.rewind(step)                          # drop log entries of steps the checkpoint does not have
    if step == 0:
        evaluate_and_save(save=False)             # where training starts from; nothing worth a checkpoint yet

    def batches(step):                            # this rank's micro-batches of a step
        offsets = [train_offsets(meta, cfg, step, rank * accum + m) for m in range(accum)]
        return [get_batch(meta, "train", o, cfg.block_size, device) for o in offsets]

    stop = StopRequest(ddp)
    t_start, t_last, step_start, step_last, losses, stopping = time.time(), time.time(), step, step, [], False
    try:
        while step < cfg.max_iters and not stopping:
            lr = lr_at(cfg, step)
            loss_sum = train_step(train_model, model, optimizer, lr, batches(step), jacobi_for(cfg, step),
                                  cfg.grad_clip, autocast)
            step += 1
            losses.append(loss_sum)
            stopping = stop()

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                mean = torch.stack(losses).mean()
                if ddp:
                    dist.all_reduce(mean)
                    mean /= world
                loss_value, losses = mean.item(), []                            # .item() waits for the device
                if not math.isfinite(loss_value):
                    diverged(f"loss is {loss_value} at step {step}")
                now = time.time()
                tok_s = (step - step_last) * cfg.batch_tokens / (now - t_last)
                eta = (now - t_start) / (step - step_start) * (cfg.max_iters - step)
                speed = flops_tok * tok_s
                mfu = f"MFU {speed / (peak * world):.1%}" if peak else f"{speed / 1e9:.1f} GFLOP/s"
                log(f"step {step}/{cfg.max_iters} ({step / cfg.max_iters:.0%}) | loss {loss_value:.4f} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} tok/s | {mfu} | ETA {fmt_time(eta)}")
                if master:
                    run.record({"step": step, "loss": loss_value, "lr": lr, "tok_per_s": tok_s, "time": now - t_start})
                t_last, step_last = now, step
            if step % cfg.eval_interval == 0 or step == cfg.max_iters or stopping:
                evaluate_and_save()
                t_last, step_last = time.time(), step   # tokens/s counts training time only
    finally:
        stop.close()
    if stopping:
        log(f"stopped at step {step}; run the same command again to continue")
    elif step_start >= cfg.max_iters:
        log(f"{run.ckpt} has already trained for max_iters={cfg.max_iters}; a larger --max_iters goes on at the "
            f"final learning rate (the cosine ends at lr_decay_iters={cfg.lr_decay_iters}; set it to stretch it)")


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        rank = os.environ.get("RANK")
        print(f"interrupted{f' (rank {rank})' if rank else ''}: stopped without saving; the last checkpoint in "
              "out_dir is kept", file=sys.stderr)
        sys.exit(130)
