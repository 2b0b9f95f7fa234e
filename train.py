"""
Train PonderLM-2, or its vanilla baselines, on tokenized .bin files.

    python train.py                                     # byte-level Python stdlib corpus, K = 1, any device
    python train.py --n_thoughts=0                      # the vanilla baseline of the same size
    python train.py --n_thoughts=0 --n_layer=8          # vanilla with twice the layers: same decoding FLOPs
    torchrun --standalone --nproc_per_node=8 train.py --dataset=tinystories      # one GPU node
    python train.py --help                              # every option, with its default

Multi-node: torchrun's own flags (--nnodes, --node_rank, --rdzv_endpoint=HOST:PORT) on each node; nothing here
changes. The batch is given in tokens per optimizer step, over all ranks; gradient accumulation is derived.
A run continues from out_dir/ckpt.pt when there is one (--init_from=auto); Ctrl-C saves a checkpoint first.
"""

import argparse
import difflib
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import METHODS, build
from ponder import PonderConfig

DATA_DIR = Path(__file__).resolve().parent / "data"


def opt(default, help, gpu=None):
    return field(default=default, metadata=dict(help=help, gpu=gpu))


@dataclass
class TrainConfig:
    # data, output, evaluation
    dataset: str = opt("stdlib", "folder under data/ (or a path) with train.bin, val.bin, meta.json")
    out_dir: str = opt("out", "where ckpt.pt and log.jsonl go")
    init_from: str = opt("auto", "auto (resume if out_dir has a checkpoint), scratch, or resume")
    eval_interval: int = opt(100, "evaluate and checkpoint every this many steps", gpu=250)
    eval_windows: int = opt(160, "fixed validation windows of block_size tokens per evaluation, split over ranks",
                            gpu=1280)
    eval_exact: bool = opt(False, "also report val loss with exact thoughts (Jacobi until fixed); slow")
    eval_only: bool = opt(False, "evaluate the checkpoint in out_dir and exit")
    log_interval: int = opt(10, "print a training line every this many steps")
    # model (PonderConfig)
    method: str = opt("ponderlm2", "ponderlm2 (latent thoughts), or a baseline: pause, loop, ponderlm (K = n_thoughts)")
    n_layer: int = opt(4, "transformer blocks", gpu=6)
    n_head: int = opt(4, "attention heads", gpu=6)
    n_embd: int = opt(128, "model width d", gpu=384)
    block_size: int = opt(128, "tokens per sequence (a sequence has (K+1) times as many slots)", gpu=256)
    n_thoughts: int = opt(1, "latent thoughts K per token; 0 trains a vanilla transformer")
    jacobi_min: int = opt(2, "fewest Jacobi passes J in a training step (J is drawn per step)")
    jacobi_max: int = opt(3, "most Jacobi passes J in a training step")
    jacobi_eval: int = opt(3, "Jacobi passes J at evaluation")
    grad_passes: int = opt(0, "backpropagate through only the last n passes of the thought solve (0: all)")
    emb_scale: str = opt("auto", "token-embedding multiplier: auto (the method's own if K > 0, else 1), 1, sqrt_d, "
                                 "sqrt_2.5d")
    rope_theta: float = opt(10000.0, "rotary base")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    # optimization
    batch_tokens: int = opt(1024, "tokens per optimizer step over all ranks and micro-steps", gpu=32768)
    micro_batch: int = opt(8, "sequences per forward pass on each rank", gpu=32)
    max_iters: int = opt(600, "optimizer steps to train for", gpu=1500)
    lr: float = opt(3e-3, "peak learning rate", gpu=1.5e-3)
    min_lr_ratio: float = opt(0.1, "the cosine decays to this fraction of lr")
    warmup_iters: int = opt(30, "linear warmup steps", gpu=100)
    lr_decay_iters: int = opt(0, "length of the cosine schedule (0: max_iters)")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    # system
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto (bfloat16 on CUDA, else float32), bfloat16 or float32")
    compile: str = opt("auto", "torch.compile: auto (on for CUDA on Linux), true or false")
    seed: int = opt(1337, "seeds the init, the batches and the J draws")


MODEL_KEYS = [f.name for f in fields(PonderConfig) if f.name != "vocab_size"]
FREE_MODEL_KEYS = {"jacobi_min", "jacobi_max", "jacobi_eval", "grad_passes"}     # a resumed run may change these
SYSTEM_KEYS = {"device", "dtype", "compile"}                      # describe this machine: never taken from a checkpoint


class Fail(Exception):
    """An error the user can fix: printed as one line, no traceback."""


# ---- command line -----------------------------------------------------------------------------------------------

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
    return kind(text)


def parse_options(config_class, argv=None, description=""):
    """Command-line options from a dataclass of opt() fields: --name=value or --name value, typed like the field.
    Returns the config and the names of the options given. Unknown or ill-typed options exit with one line."""
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "train.py"
    p = argparse.ArgumentParser(usage=f"python {script} [--option=value ...]   (--help lists them)",
                                description=description + " Options take --name=value or --name value.",
                                allow_abbrev=False)
    for f in fields(config_class):
        def convert(text, kind=f.type):
            try:
                return parse_value(kind, text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

        gpu = f.metadata.get("gpu")
        help = f.metadata["help"] + (f" (on CUDA: {gpu})" if gpu is not None else "")
        flag = dict(nargs="?", const=True) if f.type is bool else {}     # a bare --flag means true
        p.add_argument(f"--{f.name}", type=convert, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                       help=help + f" [default: {f.default}]", **flag)
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        name = u.split("=")[0].lstrip("-")
        close = difflib.get_close_matches(name, [f.name for f in fields(config_class)], n=1)
        p.error(f"unknown option {u.split('=')[0]!r}" + (f"; did you mean --{close[0]}?" if close else ""))
    given = vars(args)
    return config_class(**given), set(given)


def pick_device(device, dtype):
    """Resolve --device and --dtype ('auto' or explicit) to (device, its kind, dtype name), with clear errors."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise Fail(f"--device={device}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise Fail(f"--device={device} but this machine has no {kind.upper()} device; use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise Fail(f"--dtype={dtype}: use auto, bfloat16 or float32")
    return device, kind, dtype


def resolve_system(cfg, given):
    """Device, dtype and compile, and the CUDA defaults for the options the user did not set."""
    device, kind, dtype = pick_device(cfg.device, cfg.dtype)
    if kind == "cuda":
        for f in fields(TrainConfig):
            if f.metadata["gpu"] is not None and f.name not in given:
                setattr(cfg, f.name, f.metadata["gpu"])
    compile = cfg.compile.lower()
    if compile not in ("auto", "true", "false"):
        raise Fail(f"--compile={cfg.compile}: use auto, true or false")
    compile = kind == "cuda" and platform.system() == "Linux" if compile == "auto" else compile == "true"
    return device, kind, dtype, compile


def check_config(cfg):
    for name in ("eval_interval", "eval_windows", "log_interval", "batch_tokens", "micro_batch", "max_iters"):
        if getattr(cfg, name) < 1:
            raise Fail(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise Fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise Fail(f"--lr must be > 0 and --min_lr_ratio within [0, 1], got {cfg.lr} and {cfg.min_lr_ratio}")
    if cfg.method not in METHODS:
        raise Fail(f"--method={cfg.method}: use {', '.join(METHODS)}")
    if cfg.init_from not in ("auto", "scratch", "resume"):
        raise Fail(f"--init_from={cfg.init_from}: use auto, scratch or resume")


# ---- data -------------------------------------------------------------------------------------------------------

def dataset_dir(name):
    return Path(name) if os.sep in name or "/" in name else DATA_DIR / name


def load_meta(cfg, master):
    """The dataset's meta.json; the default stdlib corpus is prepared on first use (by rank 0, others wait)."""
    folder = dataset_dir(cfg.dataset)
    if cfg.dataset == "stdlib" and not (folder / "meta.json").exists() and master:
        from data.prepare import prepare_stdlib
        print("preparing the default corpus (the Python standard library, byte-level) ...")
        prepare_stdlib(folder)
    if dist.is_initialized():
        dist.barrier()
    if not (folder / "meta.json").exists():
        raise Fail(f"dataset {cfg.dataset!r} not found: {folder}/meta.json is missing; prepare it first, e.g. "
                   f"python data/prepare.py text PATH --name={folder.name}")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        n = path.stat().st_size // 2 if path.exists() else 0
        if n != meta[f"{split}_tokens"]:
            raise Fail(f"{path} holds {n:,} tokens but meta.json says {meta[f'{split}_tokens']:,}: prepare it again")
        if n < cfg.block_size + 1:
            raise Fail(f"{path} has {n:,} tokens, fewer than block_size+1 = {cfg.block_size + 1}; lower --block_size")
    meta["folder"] = folder
    return meta


def get_batch(path, offsets, T, device):
    data = np.memmap(path, dtype=np.uint16, mode="r")    # a fresh memmap per call: no growing page cache
    xy = torch.from_numpy(np.stack([data[o:o + T + 1] for o in offsets]).astype(np.int64))
    if device.startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def train_offsets(n, cfg, step, micro):
    """Random windows drawn from (seed, step, global micro-step): a resumed run continues, never replays."""
    return np.random.default_rng([cfg.seed, step, micro]).integers(0, n - cfg.block_size, size=cfg.micro_batch)


def jacobi_for(cfg, step):
    """J for this step, the same on every rank (the method draws one J per step, for the whole batch)."""
    return int(np.random.default_rng([cfg.seed, step, 1 << 30]).integers(cfg.jacobi_min, cfg.jacobi_max + 1))


def lr_at(cfg, step):
    decay = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, meta, cfg, device, autocast, rank, world, jacobi=None):
    """Mean loss over eval_windows fixed, evenly spaced validation windows (the same for any number of ranks or
    micro-batch size), micro_batch windows per forward, the forwards split over ranks, then all-reduced."""
    path = meta["folder"] / "val.bin"
    offsets = np.linspace(0, meta["val_tokens"] - cfg.block_size - 1, cfg.eval_windows).astype(np.int64)
    batches = [offsets[i:i + cfg.micro_batch] for i in range(0, len(offsets), cfg.micro_batch)]
    model.eval()
    total = torch.zeros((), device=device)
    for batch in batches[rank::world]:
        x, y = get_batch(path, batch, cfg.block_size, device)
        with autocast:
            _, loss = model(x, y, jacobi=jacobi)
        total += loss.float() * len(batch)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / len(offsets)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the previous checkpoint intact."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):       # make the rename itself durable (POSIX)
            fd = os.open(Path(path).parent, os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or use another --out_dir")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "model_config", "train_config", "step"} <= set(ckpt):
        raise Fail(f"{path} is not a checkpoint of train.py; delete it or use another --out_dir")
    return ckpt


# Dense bf16 peak FLOP/s by device name; the first name contained in torch.cuda.get_device_name() wins.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
             "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(kind, dtype):
    if kind != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def logged_step(line):
    """The step of a log.jsonl line, or None for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return None


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the run ----------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg, given = parse_options(TrainConfig, argv, "Train PonderLM-2.")
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device, kind, dtype, compile = resolve_system(cfg, given)
    if ddp:
        if kind == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")

    # Resume: the checkpoint's settings, except the options given now; model shape must match.
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    resume = cfg.init_from == "resume" or cfg.init_from == "auto" and ckpt_path.exists() or cfg.eval_only
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise Fail(f"no checkpoint at {ckpt_path} to resume; train one first (python train.py --out_dir={out})")
        ckpt = load_checkpoint(ckpt_path)
        for key in MODEL_KEYS:
            if key in given and key not in FREE_MODEL_KEYS and getattr(cfg, key) != ckpt["model_config"][key]:
                raise Fail(f"{ckpt_path} has {key}={ckpt['model_config'][key]}, not {getattr(cfg, key)}; drop "
                           f"--{key} to resume it, or train the new model in another --out_dir")
        saved = {k: v for k, v in ckpt["train_config"].items() if k not in SYSTEM_KEYS}
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given | SYSTEM_KEYS}})
        cfg.init_from = "resume"
    elif ckpt_path.exists():
        log(f"warning: starting over (--init_from=scratch); {ckpt_path} will be overwritten")
    check_config(cfg)
    if cfg.method != "ponderlm2" and (unused := sorted(given & {"jacobi_min", "jacobi_max", "jacobi_eval", "grad_passes"})):
        raise Fail(f"--{unused[0]} applies to the thought solve of ponderlm2 only; {cfg.method} is exact in one forward")
    meta = load_meta(cfg, master)
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)       # padded to a multiple of 64 for fast matmuls
    try:
        mconf = PonderConfig(vocab_size=vocab, **{k: getattr(cfg, k) for k in MODEL_KEYS})
    except ValueError as e:
        raise Fail(str(e)) from None
    if ckpt is not None and ckpt.get("method", "ponderlm2") != cfg.method:
        raise Fail(f"{ckpt_path} is a {ckpt.get('method', 'ponderlm2')} model, not {cfg.method}; drop --method to "
                   f"resume it, or train the new model in another --out_dir")
    if ckpt is not None and ckpt["model_config"]["vocab_size"] != vocab:
        raise Fail(f"{ckpt_path} has a vocabulary of {ckpt['model_config']['vocab_size']}, dataset {cfg.dataset!r} "
                   f"needs {vocab} ({meta['tokenizer']}); use the dataset it was trained on, or another --out_dir")

    if "micro_batch" not in given:          # the default shrinks to fit: e.g. more ranks, same batch_tokens
        while cfg.micro_batch > 1 and cfg.batch_tokens % (cfg.micro_batch * cfg.block_size * world):
            cfg.micro_batch -= 1
    tokens_per_micro = cfg.micro_batch * cfg.block_size * world
    if cfg.batch_tokens % tokens_per_micro:
        raise Fail(f"--batch_tokens={cfg.batch_tokens} is not a multiple of micro_batch*block_size*ranks = "
                   f"{cfg.micro_batch}*{cfg.block_size}*{world} = {tokens_per_micro}")
    accum = cfg.batch_tokens // tokens_per_micro

    torch.manual_seed(cfg.seed)
    model = build(cfg.method, mconf).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=kind == "cuda")
    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise Fail(f"{ckpt_path} does not match the model it describes ({str(e).splitlines()[0]})") from None
        step = ckpt["step"]
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    fast = torch.compile(model) if compile else model    # `model` stays the plain module: it is what we save
    train_model = DDP(fast, device_ids=[local_rank] if kind == "cuda" else None, broadcast_buffers=False) if ddp else fast

    def run_eval():
        val = {"val_loss": evaluate(fast, meta, cfg, device, autocast, rank, world)}
        if cfg.eval_exact and cfg.n_thoughts:
            val["val_loss_exact"] = evaluate(model, meta, cfg, device, autocast, rank, world, jacobi="exact")
        if not all(math.isfinite(v) for v in val.values()):
            raise Fail(f"validation loss is {val} at step {step}: training diverged; the last good checkpoint "
                       f"stays in {ckpt_path} (try a lower --lr)")
        return val

    flops_tok = model.flops_per_token()
    peak = peak_flops(kind, dtype)
    log(f"model: {cfg.method}, {model.num_params():,} parameters ({model.num_params(True):,} in blocks), K={cfg.n_thoughts}, "
        f"{cfg.n_layer}x{cfg.n_embd}, block {cfg.block_size}, {flops_tok / 1e6:.1f} MFLOP per training token")
    log(f"data: {meta['folder']} ({meta['train_tokens']:,} train tokens, {meta['tokenizer']}); {cfg.batch_tokens:,} "
        f"tokens per step = {cfg.micro_batch} seqs x {cfg.block_size} x {world} ranks x {accum} accumulation")
    log(f"system: {device}, {dtype}, compile {'on' if compile else 'off'}"
        + (f"; resuming {ckpt_path} at step {step}" if ckpt else ""))

    def record(entry):
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    if cfg.eval_only:
        val = run_eval()
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if master:
            record({"step": step, "eval_only": True, **val})
        return val

    def checkpoint(val):
        save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                        model_config=asdict(mconf), train_config=asdict(cfg), step=step,
                                        method=cfg.method,
                                        tokenizer=meta["tokenizer"], **val))

    if master:
        out.mkdir(parents=True, exist_ok=True)
        entries = (out / "log.jsonl").read_text(encoding="utf-8").splitlines() if (out / "log.jsonl").exists() else []
        kept = [e for e in entries if ckpt is not None and (s := logged_step(e)) is not None and s <= step]
        (out / "log.jsonl").write_text("".join(e + "\n" for e in kept), encoding="utf-8")   # drop steps undone
        if step == 0:
            val = run_eval()
            record({"step": 0, **val})
            log(f"step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    elif step == 0:
        run_eval()

    stop = []                          # Ctrl-C: finish the step, save, exit (single process only)
    if not ddp:
        def on_interrupt(sig, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)        # a second Ctrl-C stops at once
            stop.append(True)
        previous_handler = signal.signal(signal.SIGINT, on_interrupt)

    train_path = meta["folder"] / "train.bin"
    t_start, t_last, step_start, step_last, losses = time.time(), time.time(), step, step, []
    try:
        while step < cfg.max_iters and not stop:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            J = jacobi_for(cfg, step)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = get_batch(train_path, train_offsets(meta["train_tokens"], cfg, step, rank * accum + micro),
                                 cfg.block_size, device)
                if ddp:
                    train_model.require_backward_grad_sync = micro == accum - 1   # sync gradients on the last only
                with autocast:
                    _, loss = train_model(x, y, jacobi=J)
                (loss / accum).backward()
                loss_sum += loss.detach() / accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_sum)

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                mean = torch.stack(losses).mean()
                if ddp:
                    dist.all_reduce(mean)
                    mean /= world
                loss_value, losses = mean.item(), []                            # .item() waits for the device
                if not math.isfinite(loss_value):
                    raise Fail(f"loss is {loss_value} at step {step}: training diverged; the last good checkpoint "
                               f"stays in {ckpt_path} (try a lower --lr)")
                now = time.time()
                tok_s = (step - step_last) * cfg.batch_tokens / (now - t_last)
                eta = (now - t_start) / (step - step_start) * (cfg.max_iters - step)
                mfu = f"MFU {flops_tok * tok_s / (peak * world):.1%}" if peak else f"{flops_tok * tok_s / 1e9:.1f} GFLOP/s"
                log(f"step {step}/{cfg.max_iters} ({step / cfg.max_iters:.0%}) | loss {loss_value:.4f} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} tok/s | {mfu} | ETA {fmt_time(eta)}")
                if master:
                    record({"step": step, "loss": loss_value, "lr": lr, "tok_per_s": tok_s, "time": now - t_start})
                t_last, step_last = now, step
            if step % cfg.eval_interval == 0 or step == cfg.max_iters or stop:
                val = run_eval()
                log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()) + f"; saved {ckpt_path}")
                if master:
                    record({"step": step, **val})
                    checkpoint(val)
                t_last, step_last = time.time(), step   # tokens/s counts training time only
    finally:
        if not ddp:
            signal.signal(signal.SIGINT, previous_handler)
    if stop:
        log(f"interrupted at step {step}; run the same command again to continue")
    elif step_start >= cfg.max_iters:
        log(f"{ckpt_path} has already trained for max_iters={cfg.max_iters}; pass a larger --max_iters to go on")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
