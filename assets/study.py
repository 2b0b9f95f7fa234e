"""
The small-scale study behind README's "Does thinking help?": PonderLM-2 against vanilla baselines on the stdlib
corpus, every row at its own best learning rate.

    python assets/study.py                 # trains what is missing (resumable), evaluates, writes the report
    pip install matplotlib                 # optional: for assets/study_curves.png

Runs go to study/<row>_lr<lr>_s<seed>/, two at a time with one thread each (OMP_NUM_THREADS=1); each run is a
plain `python train.py ...` whose command is printed. The report is assets/study.md (and the figure).
"""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ponder import PonderConfig, PonderLM  # noqa: E402

STUDY = REPO / "study"
STEPS = 1200                                   # optimizer steps of the equal-token rows (1,024 tokens each)
LRS = [2e-3, 4e-3, 8e-3]                       # the sweep; extended while a row's best is at an edge
COMMON = ["--n_embd=128", "--n_head=4", "--block_size=128", "--batch_tokens=1024", "--micro_batch=8",
          "--eval_batches=20", "--device=cpu", "--log_interval=50"]
ROWS = {                                       # name: (n_layer, n_thoughts, what it is)
    "vanilla-L": (2, 0, "vanilla, L = 2 layers"),
    "ponder-L": (2, 1, "PonderLM-2, K = 1, L = 2"),
    "vanilla-2L": (4, 0, "vanilla, 2L = 4 layers: the decoding FLOPs of ponder-L"),
    "ponder-L-K2": (2, 2, "PonderLM-2, K = 2, L = 2"),
    "vanilla-L-flops": (2, 0, "vanilla, L = 2, trained on ponder-L's training FLOPs"),
}
SEEDS = {"vanilla-L": [1, 2], "ponder-L": [1, 2], "vanilla-2L": [1, 2], "ponder-L-K2": [1], "vanilla-L-flops": [1]}


def model(row):
    L, K, _ = ROWS[row]
    return PonderLM(PonderConfig(vocab_size=256, block_size=128, n_layer=L, n_head=4, n_embd=128, n_thoughts=K))


def steps(row):
    if row != "vanilla-L-flops":
        return STEPS
    return round(STEPS * model("ponder-L").flops_per_token() / model("vanilla-L").flops_per_token())


def run_dir(row, lr, seed):
    return STUDY / f"{row}_lr{lr:g}_s{seed}"


def train(row, lr, seed):
    """Train one run to completion (train.py resumes a partial one); returns its directory."""
    out = run_dir(row, lr, seed)
    L, K, _ = ROWS[row]
    n = steps(row)
    args = [*COMMON, f"--n_layer={L}", f"--n_thoughts={K}", f"--lr={lr:g}", f"--seed={seed}", f"--max_iters={n}",
            f"--warmup_iters={n // 50}", f"--eval_interval={n // 12}", f"--out_dir={out}"]
    if (out / "done.json").exists():
        return out
    resumed = (out / "ckpt.pt").exists()          # then the wall time covers only the last part
    out.mkdir(parents=True, exist_ok=True)
    print("OMP_NUM_THREADS=1 python train.py " + " ".join(args), flush=True)
    t0 = time.time()
    with open(out / "train.out", "a") as f:
        r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"{out.name} failed: see {out / 'train.out'}")
    (out / "done.json").write_text(json.dumps({"wall": time.time() - t0, "resumed": resumed}))
    return out


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def evals(out):
    """The evaluations made during training (not those of a later --eval_only)."""
    return [e for e in log(out) if "val_loss" in e and not e.get("eval_only")]


def final_val(out):
    return evals(out)[-1]["val_loss"]


def exact_val(out):
    """Val loss with exact thoughts, from a `train.py --eval_only --eval_exact` run made once."""
    def logged():
        return [e["val_loss_exact"] for e in log(out) if e.get("eval_only") and "val_loss_exact" in e]
    if not logged():
        subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--eval_only", "--eval_exact"], cwd=REPO,
                       check=True, capture_output=True)
    return logged()[-1]


def run_all(jobs):
    jobs = sorted(jobs, key=lambda j: -model(j[0]).flops_per_token() * steps(j[0]))   # longest first
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda j: train(*j), jobs))


def best_lr(row, seed=1):
    tried = {lr: final_val(run_dir(row, lr, seed)) for lr in lrs_tried(row)}
    return min(tried, key=tried.get), tried


def lrs_tried(row):
    return sorted(float(m.group(1)) for p in STUDY.glob(f"{row}_lr*_s1") if (p / "done.json").exists()
                  for m in [re.match(rf"{re.escape(row)}_lr(.+)_s1$", p.name)])


def main():
    run_all([(row, lr, 1) for row in ROWS for lr in LRS])
    for _ in range(2):                          # extend the grid while the best lr sits at its edge
        extra = []
        for row in ROWS:
            best, tried = best_lr(row)
            lrs = sorted(tried)
            if best == lrs[0]:
                extra.append((row, best / 2, 1))
            elif best == lrs[-1]:
                extra.append((row, best * 2, 1))
        if not extra:
            break
        run_all(extra)
    run_all([(row, best_lr(row)[0], s) for row in ROWS for s in SEEDS[row] if s != 1])

    results = {}
    for row in ROWS:
        lr, sweep = best_lr(row)
        outs = [run_dir(row, lr, s) for s in SEEDS[row]]
        m = model(row)
        r = dict(lr=lr, sweep=sweep, val=[final_val(o) for o in outs], params=m.num_params(),
                 train_tokens=steps(row) * 1024, train_flops=m.flops_per_token() * steps(row) * 1024,
                 infer_flops=m.flops_per_token(training=False), wall=[json.loads((o / "done.json").read_text())["wall"]
                                                                       for o in outs],
                 curves={o.name: [(e["step"] * 1024, e["val_loss"]) for e in evals(o)] for o in outs})
        if ROWS[row][1]:                        # ponder rows: val loss with exact thoughts too
            r["val_exact"] = [exact_val(o) for o in outs]
        results[row] = r
    for row, speed in decode_speeds({row: run_dir(row, r["lr"], 1) for row, r in results.items()}).items():
        results[row]["decode"] = speed
    (STUDY / "results.json").write_text(json.dumps(results, indent=1))
    report(results)


def decode_speeds(outs, rounds=5):
    """Tokens/s of `sample.py` (3 x 500 tokens, greedy) per run, measured alone on one thread. This machine's
    timings wander by 10-20 % from one run to the next, so the rows take turns for several rounds and each keeps
    its best."""
    path = STUDY / "decode.json"                 # {run folder: [tokens/s per round]}
    speeds = json.loads(path.read_text()) if path.exists() else {}
    if set(speeds) != {out.name for out in outs.values()}:
        speeds = {out.name: [] for out in outs.values()}
        for _ in range(rounds):
            for out in outs.values():
                p = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--num_samples=3",
                                    "--max_new_tokens=500", "--temperature=0", "--seed=1"], cwd=REPO, check=True,
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                speeds[out.name].append(float(re.search(r"([\d.]+) tokens/s", p.stderr).group(1)))
        path.write_text(json.dumps(speeds))
    return {row: max(speeds[out.name]) for row, out in outs.items()}


def report(results):
    import math
    lines = ["| run | what | layers | K | best lr (sweep: final val loss) | params | train tokens | train FLOPs | "
             "decode FLOPs/token | val loss, J=3 (nats/token) | val loss, exact thoughts | bits/byte | wall time | "
             "decode tokens/s |", "|" + "---|" * 14]
    for row, r in results.items():
        L, K, what = ROWS[row]
        sweep = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(r["sweep"].items()))
        vals = " / ".join(f"{v:.3f}" for v in r["val"])
        exact = " / ".join(f"{v:.3f}" for v in r.get("val_exact", [])) or "n/a"
        bpb = " / ".join(f"{v / math.log(2):.3f}" for v in r["val"])
        wall = " / ".join(f"{w / 60:.0f} min" for w in r["wall"])
        lines.append(f"| {row} | {what} | {L} | {K} | {r['lr']:g} ({sweep}) | {r['params'] / 1e6:.2f}M | "
                     f"{r['train_tokens'] / 1e6:.2f}M | {r['train_flops']:.2e} | {r['infer_flops'] / 1e6:.2f}M | "
                     f"{vals} | {exact} | {bpb} | {wall} | {r['decode']:.0f} |")
    (REPO / "assets" / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for (row, r), color in zip(results.items(), ["C0", "C1", "C2", "C3", "C7"]):
        per_token = r["train_flops"] / r["train_tokens"]
        for i, (name, curve) in enumerate(r["curves"].items()):
            tokens, loss = zip(*curve[1:])
            label = f"{row} (lr {r['lr']:g})" if i == 0 else None
            style = "-" if i == 0 else "--"
            if row != "vanilla-L-flops":        # trained on 8x the tokens: only the compute panel fits it
                axes[0].plot([t / 1e6 for t in tokens], loss, style, color=color, label=label)
            axes[1].plot([t * per_token for t in tokens], loss, style, color=color, label=label)
    axes[0].set(xlabel="training tokens (millions)", ylabel="val loss (nats/token, J=3)", xlim=(0, STEPS * 1024 / 1e6))
    axes[1].set(xlabel="training FLOPs", xscale="log")
    for ax in axes:
        ax.set_ylim(top=2.6)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    axes[0].set_title("equal training tokens (dashed: second seed)")
    axes[1].set_title("by training compute")
    fig.tight_layout()
    fig.savefig(REPO / "assets" / "study_curves.png", dpi=110)


if __name__ == "__main__":
    main()
