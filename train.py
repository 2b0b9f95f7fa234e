"""
Train PonderLM-2, a vanilla model (K = 0), or one of the paper's baselines, on tokenized .bin files.

    python train.py                                              # byte-level stdlib corpus, K = 1, any device
    python train.py --n_thoughts=0 --out_dir=out-vanilla         # the vanilla model of the same size
    python train.py --method=pause --n_thoughts=3 --out_dir=out-pause     # a baseline: pause, loop or ponderlm
    python train.py --init_from=out-vanilla --n_thoughts=1 --out_dir=out-late     # thoughts added to a trained model
    torchrun --standalone --nproc_per_node=8 train.py --dataset=tinystories      # one GPU node
    python train.py --help                                       # every option, with its default

Running the same command again continues the run in out_dir. Ctrl-C, SIGTERM or SIGHUP finishes the step,
evaluates, saves and exits; a second one (a second or more later) stops at once. The machinery (options, run
folder, checkpoints, signals, datasets) is in common.py; this file is the training itself, top to bottom.
"""

import math
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from baselines import METHODS, build
from common import Fail, opt
from ponder import EMB_SCALES, PonderConfig


# Every option is a field: opt(default, help, gpu=..., neox=...) gives its default on CPU and, where they differ,
# its default on CUDA and with --arch=neox, which apply unless the option was given on the command line (`given`).
@dataclass
class TrainConfig:
    # data, output, evaluation
    dataset: str = opt("stdlib", "folder under data/ (or a path) with train.bin, val.bin, meta.json")
    out_dir: str = opt("out", "where ckpt.pt and log.jsonl go; one run at a time")
    init_from: str = opt("auto", "auto (resume if out_dir has a checkpoint), scratch, resume, or a PATH: a new run "
                                 "from the weights of another run (its ckpt.pt or out_dir) or of a Hugging Face "
                                 "GPT-NeoX folder")
    eval_interval: int = opt(100, "evaluate and checkpoint every this many steps", gpu=250)
    eval_windows: int = opt(160, "fixed validation windows of block_size tokens per evaluation, split over ranks",
                            gpu=1280)
    eval_exact: bool = opt(False, "also report val loss with exact thoughts (Jacobi until fixed, up to the rounding "
                                  "of the compute dtype: bf16 stops early); slow")
    eval_only: bool = opt(False, "evaluate the checkpoint in out_dir and exit")
    log_interval: int = opt(10, "print a training line every this many steps")
    # model (PonderConfig, and the method that uses it)
    method: str = opt("ponderlm2", "ponderlm2 (latent thoughts), or a baseline: pause, loop, ponderlm (K = n_thoughts)")
    arch: str = opt("llama", "the block: llama, or neox (GPT-NeoX as in Pythia)")
    n_layer: int = opt(4, "transformer blocks", gpu=6)
    n_head: int = opt(4, "attention heads", gpu=6)
    n_embd: int = opt(128, "model width d", gpu=384)
    block_size: int = opt(128, "tokens per sequence (a sequence has (K+1) times as many slots)", gpu=256)
    n_thoughts: int = opt(1, "K: latent thoughts per token (pause slots, extra loops or passes); 0 is vanilla")
    jacobi_min: int = opt(2, "fewest Jacobi passes J in a training step (one J per optimizer step)")
    jacobi_max: int = opt(3, "most Jacobi passes J in a training step", neox=4)
    jacobi_eval: int = opt(3, "Jacobi passes J at evaluation")
    grad_passes: int = opt(0, "backpropagate through only the last n passes (the final, scored pass counts as one; "
                              "0: all)")
    emb_scale: str = opt("auto", "token-embedding multiplier: auto (the method's own if K > 0, else 1), "
                                 + ", ".join(EMB_SCALES))
    rotary_pct: float = opt(1.0, "fraction of each head's dimensions turned by rotary embeddings", neox=0.25)
    rope_theta: float = opt(10000.0, "rotary base")
    norm_eps: float = opt(1e-5, "epsilon of the norms")
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
    compile: str = opt("auto", "torch.compile each block: auto (on for CUDA on Linux), true or false", bare="true")
    seed: int = opt(1337, "seeds the init, the batches and the J draws")

    def check(self, given):
        """Every option, before any work (floats are already known to be finite). Returns the model's config."""
        ranges = [("eval_interval eval_windows log_interval batch_tokens micro_batch max_iters", 1, math.inf,
                   "[1, inf)"),
                  ("warmup_iters lr_decay_iters weight_decay grad_clip", 0, math.inf, "[0, inf)"),
                  ("beta1 beta2", 0, 1, "[0, 1)"), ("seed", 0, 2**63, "[0, 2**63)")]      # low <= value < high
        for names, low, high, said in ranges:
            for name in names.split():
                if not low <= getattr(self, name) < high:
                    raise Fail(f"--{name} must be within {said}, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise Fail(f"--min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        if not self.lr > 0:
            raise Fail(f"--lr must be > 0, got {self.lr}")
        words = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}
        self.compile = words.get(c := self.compile.strip().lower(), c)     # the words bool options take, too
        for name, allowed in dict(method=tuple(METHODS), compile=("auto", "true", "false")).items():
            if getattr(self, name) not in allowed:
                raise Fail(f"--{name}={getattr(self, name)}: use {', '.join(allowed)}")
        if self.init_from not in ("auto", "scratch", "resume") and not common.source_path(self.init_from).exists():
            raise Fail(f"--init_from={self.init_from}: no checkpoint there; use auto, scratch, resume, or the path of "
                       "a train.py checkpoint (or of its out_dir, or of a Hugging Face GPT-NeoX folder)")
        # The baselines compute their extra steps exactly in one forward: a Jacobi option for them is a mistake.
        if self.method != "ponderlm2" and (unused := sorted(given & common.THOUGHT_KEYS)):
            raise Fail(f"--{unused[0]} belongs to PonderLM-2's thought solve; {self.method} is exact in one forward")
        try:        # the model's own checks too; the vocabulary comes from the dataset later
            return PonderConfig(vocab_size=1, **{k: getattr(self, k) for k in common.MODEL_KEYS})
        except ValueError as e:
            raise Fail(str(e)) from None


# ---- data: random windows of block_size tokens from the uint16 token files -------------------------------------

def get_batch(data, split, offsets, T, device):
    """Inputs and targets (B, T) of the windows starting at offsets. The targets are the next tokens or, where the
    dataset has a targets file, its values at the same positions (-1: not scored)."""
    tokens = np.memmap(data["folder"] / f"{split}.bin", dtype=np.uint16, mode="r")   # a fresh memmap per call
    if data["targets"]:
        targets = np.memmap(data["folder"] / f"{split}_targets.bin", dtype=np.int32, mode="r")
        xy = np.stack([np.stack([tokens[o:o + T], targets[o:o + T]]) for o in offsets], axis=1)
    else:                                           # language modelling: the target of token t is token t+1
        windows = np.stack([tokens[o:o + T + 1] for o in offsets])
        xy = np.stack([windows[:, :-1], windows[:, 1:]])
    xy = torch.from_numpy(xy.astype(np.int64))                          # (2, B, T)
    if device.startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)          # the copy overlaps with the GPU's work
    return xy[0].to(device), xy[1].to(device)


def train_offsets(data, cfg, step, micro):
    """Random windows drawn from (seed, step, global micro-step): a resumed run goes on, never replays."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    return rng.integers(0, common.windows(data, "train", cfg.block_size), size=cfg.micro_batch) * data["align"]


def jacobi_for(cfg, step):
    """J for this step: one draw per optimizer step, shared by its micro-steps and ranks, so that a run does not
    depend on how its batch is split over them."""
    # (1 << 30 keeps this random stream apart from the batches' [seed, step, micro-step] streams)
    return int(np.random.default_rng([cfg.seed, step, 1 << 30]).integers(cfg.jacobi_min, cfg.jacobi_max + 1))


def lr_at(cfg, step):
    """Linear warmup to lr, then a cosine down to lr*min_lr_ratio at lr_decay_iters, then that floor."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    decay = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, data, cfg, device, autocast, rank, world, jacobi=None):
    """Mean loss over eval_windows fixed, evenly spaced validation windows (the same for any number of ranks or
    micro-batch size), the forwards split over ranks, then all-reduced. Each forward takes the same number of
    windows (the largest divisor of eval_windows up to micro_batch), so a compiled model sees one shape."""
    offsets = np.linspace(0, common.windows(data, "val", cfg.block_size) - 1, cfg.eval_windows).astype(np.int64)
    size = max(b for b in range(1, cfg.micro_batch + 1) if cfg.eval_windows % b == 0)
    batches = np.split(offsets * data["align"], cfg.eval_windows // size)
    model.eval()
    total = torch.zeros((), device=device)
    for batch in batches[rank::world]:
        x, y = get_batch(data, "val", batch, cfg.block_size, device)
        with autocast:
            _, loss = model(x, y, jacobi=jacobi)
        total += loss.float() * len(batch)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return total.item() / len(offsets)


def main(argv=None):
    # ---- options and the machine --------------------------------------------------------------------------------
    cfg, given = common.parse_options(TrainConfig, argv, "Train PonderLM-2 or a baseline.")
    rank, local_rank, world, ddp = common.ranks()       # torchrun starts one process per GPU and says which we are
    master = rank == 0                                  # rank 0 logs, writes the checkpoint and owns out_dir
    log = common.Console(master)
    device, kind, dtype = common.pick_device(cfg.device, cfg.dtype)
    if kind == "cuda":
        common.use_defaults(cfg, given, "gpu")          # a bigger model and batch where there is a GPU
    cfg.check(given)                                    # every option is checked before anything is touched
    compile = kind == "cuda" and platform.system() == "Linux" if cfg.compile == "auto" else cfg.compile == "true"

    run = common.RunDir(cfg.out_dir)                    # out_dir: ckpt.pt, log.jsonl, and a lock
    if master:
        run.claim()                                     # a second run aimed at the same folder stops here
    try:
        if ddp:
            device = common.join_process_group(kind, local_rank)

        # ---- where the run starts: out_dir's checkpoint (resume), another run's weights (--init_from), or scratch --
        cfg, ckpt, source = common.start_config(cfg, given, run, TrainConfig)
        mconf = cfg.check(given)                        # again: a checkpoint or --arch=neox may have set options
        data = common.load_dataset(cfg.dataset, cfg.block_size, master, cfg.eval_windows)
        mconf.vocab_size = 64 * math.ceil(data["vocab_size"] / 64)    # padded to a multiple of 64 for fast matmuls
        common.check_fit(data, mconf, {run.ckpt: ckpt, cfg.init_from: source})   # weights and data: one tokenizer
        # The batch is given in tokens; the sequences per forward (micro_batch) and the gradient accumulation steps
        # follow from it and the number of ranks.
        cfg.micro_batch, accum, cfg.batch_tokens = common.batch_layout(cfg, given, world)
        if ckpt is None:
            cfg.lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters   # the schedule's length, kept on resume
            if master and (run.ckpt.exists() or run.log.exists()):     # only now that every check has passed
                log(f"starting over: the previous run's files went to {run.set_aside()}")

        # ---- the model and its optimizer ----------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)                     # the same initial weights on every rank
        model = build(cfg.method, mconf)                # PonderLM-2 (ponder.py) or a baseline (baselines.py)
        if ckpt or source:
            model = common.model_from(ckpt or source, run.ckpt if ckpt else cfg.init_from, mconf, cfg.method)
        if source:
            log(f"starting from the weights of {cfg.init_from} (step {source['step']} of that run, K="
                f"{source['model_config']['n_thoughts']}, token embeddings x {cfg.emb_scale} as there unless "
                "--emb_scale says otherwise); the optimizer and the schedule start anew")
        model.to(device)
        # AdamW, with weight decay on the matrices (embeddings included) but not on norms and biases: decay pulls a
        # norm's gain towards 0, not towards its neutral 1
        params = [p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([dict(params=params[0], weight_decay=cfg.weight_decay),
                                       dict(params=params[1], weight_decay=0.0)],
                                      lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=kind == "cuda")
        if ckpt and not cfg.eval_only:
            common.load_optimizer_state(optimizer, ckpt.get("optimizer"), run.ckpt)
        step = ckpt["step"] if ckpt else 0

        # bf16 autocast where the GPU computes it natively. Each block is compiled on its own: one small static graph
        # per slot count and grad mode, whatever J is, instead of a graph per number of passes. DDP averages the
        # gradients over the ranks; `model` stays the plain module, the one we save and evaluate (on every rank,
        # never through the DDP wrapper).
        autocast = torch.autocast(kind, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
        if compile:
            torch._dynamo.config.cache_size_limit = 64
            for block in model.blocks:
                block.compile(dynamic=False)
        train_model = DDP(model, device_ids=[local_rank] if kind == "cuda" else None) if ddp else model

        log(common.summary(cfg, model, data, accum, world, device, dtype, compile, ckpt and run.ckpt, step))
        flops_tok, peak = model.flops_per_token(), common.peak_flops(kind, dtype)    # FLOPs: thought passes included

        def validate():
            """The validation losses at this step (with exact thoughts too, if asked); a non-finite one ends the run.
            Every rank evaluates its share of the windows."""
            val = {"val_loss": evaluate(model, data, cfg, device, autocast, rank, world)}
            if cfg.eval_exact and cfg.n_thoughts and cfg.method == "ponderlm2":
                val["val_loss_exact"] = evaluate(model, data, cfg, device, autocast, rank, world, jacobi="exact")
            if not all(math.isfinite(v) for v in val.values()):
                diverged(f"validation loss is {val} at step {step}")
            return val, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())

        def diverged(what):
            kept = f"the last good checkpoint stays in {run.ckpt}" if run.ckpt.exists() else "no checkpoint was saved"
            raise Fail(f"{what}: training diverged; {kept} (try a lower --lr)")

        if master and ckpt and not cfg.eval_only:
            run.rewind(step)                            # the log loses the entries after the checkpoint's step
        if cfg.eval_only or step == 0:                  # where training starts from
            val, line = validate()
            if master:
                run.record({"step": step, **({"eval_only": True} if cfg.eval_only else {}), **val})
            log(line)
            if cfg.eval_only:
                return val

        # ---- the training loop ------------------------------------------------------------------------------------
        stop = common.StopRequest(ddp)                  # Ctrl-C, SIGTERM, SIGHUP: stop after this step, and save
        t_start, t_last, step_start, step_last, losses, stopping = time.time(), time.time(), step, step, [], False
        try:
            while step < cfg.max_iters and not stopping:
                lr = lr_at(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                J = jacobi_for(cfg, step)               # Jacobi passes for every forward of this step
                loss_sum = 0
                for micro in range(accum):              # gradient accumulation: micro-batches add up to one batch
                    offsets = train_offsets(data, cfg, step, rank * accum + micro)
                    x, y = get_batch(data, "train", offsets, cfg.block_size, device)
                    if ddp:                             # average gradients over ranks only on the last micro-step
                        train_model.require_backward_grad_sync = micro == accum - 1
                    with autocast:
                        _, loss = train_model(x, y, jacobi=J)      # K growing passes, J Jacobi passes, the final one
                    # Backward runs through every pass of the thought solve (nothing is detached): the gradient
                    # reaches the thoughts themselves, which is how the model learns to think usefully.
                    (loss / accum).backward()           # the mean over micro-steps, as one big batch would give
                    loss_sum = loss_sum + loss.detach() / accum
                if cfg.grad_clip > 0:                   # once, on the whole batch's gradient
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss_sum)                 # kept on the device: no synchronisation until we log
                stopping = stop()                       # did any rank get a signal?

                if step % cfg.log_interval == 0 or step == cfg.max_iters:
                    mean = torch.stack(losses).mean()
                    if ddp:
                        dist.all_reduce(mean)
                        mean /= world
                    loss_value, losses = mean.item(), []                        # .item() waits for the device
                    if not math.isfinite(loss_value):
                        diverged(f"loss is {loss_value} at step {step}")
                    now = time.time()
                    tok_s = (step - step_last) * cfg.batch_tokens / (now - t_last)
                    eta = (now - t_start) / (step - step_start) * (cfg.max_iters - step)
                    speed = flops_tok * tok_s           # model FLOPs per second, against the GPU's bf16 peak
                    mfu = f"MFU {speed / (peak * world):.1%}" if peak else f"{speed / 1e9:.1f} GFLOP/s"
                    log(f"step {step}/{cfg.max_iters} ({step / cfg.max_iters:.0%}) | loss {loss_value:.4f} | "
                        f"lr {lr:.2e} | {tok_s:,.0f} tok/s | {mfu} | ETA {common.fmt_time(eta)}")
                    if master:
                        run.record(dict(step=step, loss=loss_value, lr=lr, tok_per_s=tok_s, time=now - t_start))
                    t_last, step_last = now, step

                if step % cfg.eval_interval == 0 or step == cfg.max_iters or stopping:
                    val, line = validate()
                    if master:                          # the log entry first, then the checkpoint (never half one)
                        run.record({"step": step, **val})
                        run.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                      model_config=asdict(mconf), train_config=asdict(cfg), method=cfg.method,
                                      step=step, tokenizer=data["tokenizer"], **val))
                    log(f"{line}; saved {run.ckpt}")
                    t_last, step_last = time.time(), step   # tokens/s counts training time only
        finally:
            stop.close()
        if stopping:
            log(f"stopped at step {step}; run the same command again to continue")
        elif step_start >= cfg.max_iters:
            log(f"{run.ckpt} has already trained for max_iters={cfg.max_iters}; a larger --max_iters goes on at the "
                f"final learning rate (the cosine ends at lr_decay_iters={cfg.lr_decay_iters}; set it to stretch it)")
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
        raise common.out_of_memory(e, cfg.micro_batch, run)    # one line that says what to lower (or e itself)
    finally:
        # DDP's reducer holds the process group. Freed last, with the process group, it would destroy the group
        # holding the GIL while a gloo thread may need the GIL to free an all-reduce's tensors: a hang at exit, one
        # run in four on 2 CPU ranks. Dropped first, the group goes with destroy_process_group, which releases it.
        train_model = None  # noqa: F841
        run.release()
        common.leave_process_group()


if __name__ == "__main__":
    common.run_script(main, interrupted="interrupted: stopped without saving; the last checkpoint in out_dir is kept")
