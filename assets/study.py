"""
The same-recipe study behind README's "Is a latent thought the best use of the compute?": PonderLM-2 against
vanilla models (plain and with PonderLM-2's embedding scale), deeper and longer-trained vanilla models, the
paper's other baselines (Pause, Loop, PonderLM) and cheaper PonderLM-2 training, on the stdlib corpus, every row at
its own best learning rate.

    python assets/study.py                 # trains what is missing (resumable), evaluates, writes the report
    pip install matplotlib                 # optional: for assets/study_curves.png

Runs go to study/<row>_lr<lr>_s<seed>/, two at a time with one thread each (OMP_NUM_THREADS=1); each is a plain
`python train.py ...` whose command is printed. A scheduler starts whatever is needed next as soon as a core is
free: every row's learning-rate sweep (extended while the best rate sits at an edge), then the second seeds at the
best rate, then the FLOP-matched vanilla row once the vanilla rows have shown which embedding scale suits it.
Kill it at any time and run it again: finished runs are kept, a run cut short resumes from its checkpoint.
The report is assets/study.md, study/results.json and assets/study_curves.png.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from baselines import build  # noqa: E402
from common import RunDir  # noqa: E402
from ponder import PonderConfig  # noqa: E402

STUDY = REPO / "study"
STEPS = 1200                                   # optimizer steps of the equal-token rows (1,024 tokens each)
TOKENS_PER_STEP = 1024
COMMON = ["--n_embd=128", "--n_head=4", "--block_size=128", f"--batch_tokens={TOKENS_PER_STEP}", "--micro_batch=8",
          "--eval_windows=160", "--device=cpu", "--log_interval=50"]
VANILLA_LRS, PONDER_LRS = [1e-3, 2e-3, 4e-3], [2e-3, 4e-3, 8e-3]    # first sweeps, from the 2026-11-28 study
ROWS = {   # name: (what, train.py options, first learning rates, seeds)
    "vanilla-L": ("vanilla, L = 2", dict(n_layer=2, n_thoughts=0), VANILLA_LRS, [1, 2]),
    "vanilla-2L": ("vanilla, 2L = 4 layers", dict(n_layer=4, n_thoughts=0), VANILLA_LRS, [1, 2]),
    "vanilla-L-scaled": ("vanilla, L = 2, embeddings x sqrt(2.5d) as PonderLM-2",
                         dict(n_layer=2, n_thoughts=0, emb_scale="sqrt_2.5d"), VANILLA_LRS, [1, 2]),
    "vanilla-2L-scaled": ("vanilla, 2L = 4, embeddings x sqrt(2.5d)",
                          dict(n_layer=4, n_thoughts=0, emb_scale="sqrt_2.5d"), VANILLA_LRS, [1, 2]),
    "ponder-L": ("PonderLM-2, K = 1", dict(n_layer=2, n_thoughts=1), PONDER_LRS, [1, 2]),
    "ponder-L-K2": ("PonderLM-2, K = 2", dict(n_layer=2, n_thoughts=2), PONDER_LRS, [1]),
    "ponder-L-g2": ("PonderLM-2, K = 1, gradients through the last 2 passes",
                    dict(n_layer=2, n_thoughts=1, grad_passes=2), PONDER_LRS, "best cheaper"),
    "ponder-L-g1": ("PonderLM-2, K = 1, gradients through the final pass only",
                    dict(n_layer=2, n_thoughts=1, grad_passes=1), PONDER_LRS, "best cheaper"),
    "pause-K1": ("Pause, K = 1", dict(n_layer=2, n_thoughts=1, method="pause"), PONDER_LRS, [1, 2]),
    "loop-K1": ("Loop, K = 1 (2 loops of 2 layers)", dict(n_layer=2, n_thoughts=1, method="loop"), VANILLA_LRS, [1, 2]),
    "pause-K3": ("Pause, K = 3", dict(n_layer=2, n_thoughts=3, method="pause"), PONDER_LRS, [1]),
    "loop-K3": ("Loop, K = 3", dict(n_layer=2, n_thoughts=3, method="loop"), VANILLA_LRS, [1]),
    "ponderlm-K3": ("PonderLM (the predecessor), K = 3", dict(n_layer=2, n_thoughts=3, method="ponderlm"),
                    PONDER_LRS, [1]),
}
CHEAPER = ["ponder-L-g2", "ponder-L-g1"]
FLOPS_ROW = {"vanilla-L": "vanilla-L-flops", "vanilla-L-scaled": "vanilla-L-scaled-flops"}   # by embedding scale
LR_RANGE = (1e-4, 0.1)                         # a sweep is never extended beyond this


# ---- what a row is --------------------------------------------------------------------------------------------

def row_spec(row):
    if row in ROWS:
        return ROWS[row]
    base = next(b for b, r in FLOPS_ROW.items() if r == row)
    what, options, _, _ = ROWS[base]
    return (f"{what}, trained on ponder-L's training FLOPs", options, [5e-4, 1e-3, 2e-3], [1])


def model(row):
    options = row_spec(row)[1]
    config = PonderConfig(vocab_size=256, block_size=128, n_head=4, n_embd=128,
                          **{k: v for k, v in options.items() if k != "method"})
    return build(options.get("method", "ponderlm2"), config)


def steps(row):
    if row in ROWS:
        return STEPS
    return round(STEPS * model("ponder-L").flops_per_token() / model(row).flops_per_token())


def cost(job):
    return model(job[0]).flops_per_token() * steps(job[0])


def run_dir(row, lr, seed):
    return STUDY / f"{row}_lr{lr:g}_s{seed}"


# ---- training -------------------------------------------------------------------------------------------------

def train(row, lr, seed):
    """Train one run to completion (train.py resumes a partial one). A run that diverges counts as finished, with
    an infinite loss. Each attempt's wall and CPU time is appended to times.jsonl."""
    out = run_dir(row, lr, seed)
    n = steps(row)
    options = [f"--{k}={v}" for k, v in row_spec(row)[1].items()]
    args = [*COMMON, *options, f"--lr={lr:g}", f"--seed={seed}", f"--max_iters={n}", f"--warmup_iters={n // 50}",
            f"--eval_interval={n // 12}", f"--out_dir={out}"]
    out.mkdir(parents=True, exist_ok=True)
    code = launch(["train.py", *args], out, "train.out", "times.jsonl")
    diverged = code == 1 and "diverged" in (out / "train.out").read_text()
    if code and not diverged:
        raise SystemExit(f"{out.name} failed: see {out / 'train.out'}")
    (out / "done.json").write_text(json.dumps({"diverged": diverged}))
    return out


def done(row, lr, seed):
    return (run_dir(row, lr, seed) / "done.json").exists()


def log(out):
    return RunDir(out).entries()


def evals(out):
    """The evaluations made during training (not those of a later --eval_only)."""
    return [e for e in log(out) if "val_loss" in e and not e.get("eval_only")]


def final_val(out):
    if json.loads((out / "done.json").read_text()).get("diverged"):
        return math.inf
    return evals(out)[-1]["val_loss"]


def sweep(row):
    """{lr: final val loss} of the finished seed-1 runs of a row."""
    found = {float(m.group(1)): p for p in STUDY.glob(f"{row}_lr*_s1")
             if (m := re.fullmatch(rf"{re.escape(row)}_lr(.+)_s1", p.name)) and (p / "done.json").exists()}
    return {lr: final_val(p) for lr, p in found.items()}


def settled(row):
    """The best lr of a row once its sweep is complete and the best is not at an edge, else None."""
    tried = sweep(row)
    if any(not done(row, lr, 1) for lr in row_spec(row)[2]):
        return None
    best, lrs = min(tried, key=tried.get), sorted(tried)
    at_edge = best == lrs[0] and best / 2 >= LR_RANGE[0] or best == lrs[-1] and best * 2 <= LR_RANGE[1]
    return None if at_edge else best


def seeds(row):
    spec = row_spec(row)[3]
    if spec != "best cheaper":
        return spec
    best = {r: settled(r) for r in CHEAPER}
    if None in best.values():
        return [1]
    winner = min(CHEAPER, key=lambda r: sweep(r)[best[r]])
    return [1, 2] if row == winner else [1]


def flops_row():
    """The FLOP-matched vanilla row, with the embedding scale that gave vanilla-L the lower mean loss over seeds."""
    means = {}
    for base in FLOPS_ROW:
        lr = settled(base)
        if lr is None or not all(done(base, lr, s) for s in seeds(base)):
            return None
        means[base] = sum(final_val(run_dir(base, lr, s)) for s in seeds(base)) / len(seeds(base))
    return FLOPS_ROW[min(means, key=means.get)]


def rows():
    return [*ROWS, *([flops_row()] if flops_row() else [])]


def wanted():
    """The runs needed now, given those finished: sweeps, their extensions, then extra seeds at the best lr."""
    jobs = []
    for row in rows():
        tried = sweep(row)
        missing = [lr for lr in row_spec(row)[2] if lr not in tried]
        if missing:
            jobs += [(row, lr, 1) for lr in missing]
            continue
        best = settled(row)
        if best is None:                               # the best lr is at an edge of the sweep: go one further
            lo, hi = min(tried), max(tried)
            jobs.append((row, lo / 2, 1) if min(tried, key=tried.get) == lo else (row, hi * 2, 1))
            continue
        jobs += [(row, best, s) for s in seeds(row) if not done(row, best, s)]
    return jobs


def launch(args, out, log_name, times_name):
    """Run `python args...` in the repository with one thread, its output appended to out/log_name; append its wall
    and CPU time (of this child alone) and exit code to out/times_name. Returns the exit code. (The experiments'
    drivers, assets/retrofit.py and assets/state_tracking.py, start their runs through this too.)"""
    print(f"[{time.strftime('%H:%M:%S')}] OMP_NUM_THREADS=1 python " + " ".join(str(a) for a in args), flush=True)
    t0 = time.time()
    with open(out / log_name, "a") as f:
        p = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(p.pid, 0)           # the CPU time of this run alone
    code = os.waitstatus_to_exitcode(status)
    with open(out / times_name, "a") as f:
        f.write(json.dumps({"wall": time.time() - t0, "cpu": usage.ru_utime + usage.ru_stime, "exit": code}) + "\n")
    return code


def schedule(jobs, todo, run):
    """Keep `jobs` runs going: todo() lists the runs wanted now in the order to start them (those already running
    are passed over), run(job) does one. Returns once nothing runs and nothing more is wanted; a run that fails
    stops everything with its message."""
    running = {}
    with ThreadPoolExecutor(jobs) as pool:
        while True:
            for job, fut in list(running.items()):
                if fut.done():
                    fut.result()
                    del running[job]
            for job in [j for j in todo() if j not in running][:jobs - len(running)]:
                running[job] = pool.submit(run, job)
            if not running:
                return
            wait(running.values(), return_when=FIRST_COMPLETED)


def run_all():
    """Keep two runs going, the FLOP row first, then the longest, until nothing more is wanted."""
    schedule(2, lambda: sorted(wanted(), reverse=True, key=lambda j: (j[0] in FLOPS_ROW, cost(j))),
             lambda job: train(*job))


# ---- results --------------------------------------------------------------------------------------------------

def exact_val(out):
    """Val loss with exact thoughts, from a `train.py --eval_only --eval_exact` run made once (one thread)."""
    def logged():
        return [e["val_loss_exact"] for e in log(out) if e.get("eval_only") and "val_loss_exact" in e]
    if not logged():
        print(f"[{time.strftime('%H:%M:%S')}] OMP_NUM_THREADS=1 python train.py --out_dir={out} --eval_only "
              "--eval_exact", flush=True)
        subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--eval_only", "--eval_exact"], cwd=REPO,
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return logged()[-1]


def decode_speeds(outs, rounds=5):
    """Tokens/s of `sample.py` (3 x 500 tokens, greedy) per run, measured alone on one thread. This machine's
    timings wander by 10-20 % from one run to the next, so the rows take turns for several rounds and each keeps
    its best. Delete study/decode.json to measure again."""
    path = STUDY / "decode.json"                 # {run folder: [tokens/s per round]}
    speeds = json.loads(path.read_text()) if path.exists() else {}
    if set(speeds) != {out.name for out in outs.values()}:
        speeds = {out.name: [] for out in outs.values()}
        for i in range(rounds):
            print(f"decode speed, round {i + 1}/{rounds}", flush=True)
            for out in outs.values():
                p = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--num_samples=3",
                                    "--max_new_tokens=500", "--temperature=0", "--seed=1"], cwd=REPO, check=True,
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                speeds[out.name].append(float(re.search(r"([\d.]+) tokens/s", p.stderr).group(1)))
        path.write_text(json.dumps(speeds))
    return {row: max(speeds[out.name]) for row, out in outs.items()}


def times(out):
    parts = [json.loads(line) for line in (out / "times.jsonl").read_text().splitlines()]
    return sum(p["wall"] for p in parts), sum(p["cpu"] for p in parts)


def results():
    res = {}
    for row in rows():
        lr, what, options = settled(row), *row_spec(row)[:2]
        outs = [run_dir(row, lr, s) for s in seeds(row)]
        m = model(row)
        K = options["n_thoughts"]
        r = dict(what=what, options=options, lr=lr, sweep=sweep(row), val=[final_val(o) for o in outs],
                 params=m.num_params(), train_tokens=steps(row) * TOKENS_PER_STEP,
                 train_flops=m.flops_per_token() * steps(row) * TOKENS_PER_STEP,
                 decode_flops=m.flops_per_token(training=False), cache_slots=K + 1,
                 times=[times(o) for o in outs],
                 curves={o.name: [(e["step"] * TOKENS_PER_STEP, e["val_loss"]) for e in evals(o)] for o in outs})
        if options.get("method", "ponderlm2") == "ponderlm2" and K:     # val loss with exact thoughts too
            r["val_exact"] = [exact_val(o) for o in outs]
        res[row] = r
    for row, speed in decode_speeds({row: run_dir(row, r["lr"], 1) for row, r in res.items()}).items():
        res[row]["decode"] = speed
    return res


def report(res):
    def cell(values, fmt="{:.3f}"):
        return " / ".join(fmt.format(v) for v in values)

    lines = ["| row | what | best lr (sweep: final val loss) | params | train tokens | train FLOPs | "
             "decode FLOPs/token | KV slots/token | val loss (nats/token) | val loss, exact thoughts | "
             "wall time (CPU time) | decode tokens/s |", "|" + "---|" * 12]
    for row, r in res.items():
        sweep_ = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(r["sweep"].items()))
        took = " / ".join(f"{w / 60:.0f} min ({c / 60:.0f})" for w, c in r["times"])
        lines.append(f"| {row} | {r['what']} | {r['lr']:g} ({sweep_}) | {r['params'] / 1e6:.2f}M | "
                     f"{r['train_tokens'] / 1e6:.2f}M | {r['train_flops']:.2e} | {r['decode_flops'] / 1e6:.2f}M | "
                     f"{r['cache_slots']} | {cell(r['val'])} | {cell(r.get('val_exact', [])) or 'n/a'} | {took} | "
                     f"{r['decode']:.0f} |")
    (REPO / "assets" / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(res)


def pyplot():
    """matplotlib's pyplot, drawing to files only; None, with a note, when matplotlib is not installed (it is needed
    for the figures only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return None
    return plt


def figure(res):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.6))
    colors = plt.get_cmap("tab20").colors
    points = []                                   # (decode MFLOPs, mean loss, row) for the right panel
    for (row, r), color in zip(res.items(), colors):
        per_token = r["train_flops"] / r["train_tokens"]
        for seed, curve in enumerate(r["curves"].values()):
            tokens, loss = zip(*curve[1:])
            label = row if seed == 0 else None
            style = "-" if seed == 0 else "--"
            if row in ROWS:                            # the FLOP-matched row saw 8x the tokens: compute panel only
                axes[0].plot([t / 1e6 for t in tokens], loss, style, color=color, label=label, lw=1.2)
            axes[1].plot([t * per_token for t in tokens], loss, style, color=color, label=label, lw=1.2)
        mean = sum(r["val"]) / len(r["val"])
        axes[2].errorbar(r["decode_flops"] / 1e6, mean, yerr=[[mean - min(r["val"])], [max(r["val"]) - mean]],
                         fmt="o", color=color, capsize=3)
        points.append((r["decode_flops"] / 1e6, mean, row))
    placed = []                                   # labels top to bottom, each at least `gap` below a close one
    gap = 0.01
    for x, y, row in sorted(points, key=lambda p: -p[1]):
        label_y = min([y] + [ly - gap for px, ly in placed if abs(px - x) < 0.7 and ly - gap < y + gap])
        axes[2].annotate(row, (x, y), xytext=(x + 0.08, label_y - 0.003), fontsize=7)
        placed.append((x, label_y))
    axes[0].set(xlabel="training tokens (millions)", ylabel="val loss (nats/token)", ylim=(None, 1.8),
                title="equal training tokens (dashed: second seed)")
    axes[1].set(xlabel="training FLOPs", xscale="log", ylim=(None, 1.8), title="by training compute")
    axes[2].set(xlabel="decode FLOPs per token (millions)", ylabel="final val loss (mean; bars: seed range)",
                title="final loss against the cost of a generated token")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(REPO / "assets" / "study_curves.png", dpi=100)


def main(argv=None):
    argparse.ArgumentParser(description="The same-recipe study: trains what is missing (resumable, two runs at a "
                                        "time), evaluates, writes assets/study.md and the figure.").parse_args(argv)
    STUDY.mkdir(exist_ok=True)
    run_all()
    res = results()
    (STUDY / "results.json").write_text(json.dumps(res, indent=1))
    report(res)


if __name__ == "__main__":
    main()
