"""
Thoughts added late: a vanilla model (PonderLM-2's embedding scale, L = 2) trained for most of a 1,200-step run,
then given one latent thought per token (K = 1) for the rest, against ponder-L trained with K = 1 from the start,
and against vanilla models of 2 and 4 layers given the same training tokens or the same training FLOPs.
The recipe is the same-recipe study's (assets/study.py): width 128, stdlib bytes, 1,024 tokens per step, cosine
to 10 %, every row at its own best learning rate, val loss over the same 160 windows (J = 3, and exact thoughts).

    python assets/retrofit.py              # trains what is missing (resumable), evaluates, writes the report
    python assets/retrofit.py --jobs=2     # two runs at a time (one thread each)
    python assets/retrofit.py --report     # no training: the report from the runs finished so far

A retrofit row is two plain `train.py` runs. The vanilla phase is the first s steps of the 1,200-step scaled
vanilla-L control, schedule included (`--max_iters=s --lr_decay_iters=1200`): up to the switch the retrofit model
IS the control, so any difference at step 1,200 comes from what the last 1,200 - s steps did. The K = 1 phase is a
new run from those weights (`--init_from`): fresh AdamW state, its own 24-step warmup (what AdamW's second moments
need with beta2 = 0.95, whatever the phase's length) and cosine to 10 %, its own swept peak lr, and seed 2, so
that its batches are new windows rather than a replay of the vanilla phase's first steps (batches are drawn from
seed and step, and a new run starts at step 0).
Runs go to study/retrofit/<row>_lr<lr>_s<seed>/, each a plain `python train.py ...` whose command is printed.
Kill the script at any time and run it again: finished runs are kept, a run cut short resumes from its checkpoint.
The report is assets/retrofit.md, assets/retrofit.json and assets/retrofit.png.
"""

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "assets"))
import study  # noqa: E402   the same recipe: COMMON options, log readers, the lr-sweep rule's range
from baselines import build  # noqa: E402
from ponder import PonderConfig  # noqa: E402

OUT = REPO / "study" / "retrofit"
STEPS, TOKENS_PER_STEP, WARMUP = study.STEPS, study.TOKENS_PER_STEP, 24
VANILLA = dict(n_layer=2, n_thoughts=0, emb_scale="sqrt_2.5d")         # scaled vanilla-L: PonderLM-2's scale
VANILLA_2L = dict(n_layer=4, n_thoughts=0, emb_scale="sqrt_2.5d")
PLAIN = dict(n_layer=2, n_thoughts=0)                                   # vanilla-L without the scale
PONDER = dict(n_layer=2, n_thoughts=1)                                  # the K = 1 phase keeps its source's scale
G2 = dict(PONDER, grad_passes=2)
SWITCH = {10: 1080, 25: 900, 50: 600}          # % of the steps at K = 1 -> steps of the vanilla phase
AROUND = [2e-3, 4e-3, 8e-3]                    # the study's sweep around its best lr (0.004) for these rows
PHASE_LRS = [1e-3, 2e-3, 4e-3]                 # first sweep of the longest K = 1 phase (from a trained model)


def row(what, options, steps, lrs, prio, source=None, seed=1, extend=True, table=True, **extra):
    """A row: train.py options, steps, the first lrs of its sweep (or a function giving them once known), the order
    in which it is trained (prio), the row whose best run it starts from, and train.py options beyond the recipe."""
    return dict(what=what, options=options, steps=steps, lrs=lrs, prio=prio, source=source, seed=seed,
                extend=extend, table=table, extra=extra)


def best_of(name):
    """[the best lr of a finished row] once it is settled, for rows that must run at another row's lr."""
    return lambda: [lr] if (lr := settled(name)) else None


# The controls at 1,200 steps reproduce the study's runs exactly (same code, seed and recipe: vanilla-L-scaled gave
# 1.339 / 1.282 / 1.331 at 0.002 / 0.004 / 0.008 here, as there), so rows whose sweep the study made run again at its
# best lr only. Two cores shared with other work do not allow more.
ROWS = {
    "vanilla-L-scaled": row("scaled vanilla, L = 2", VANILLA, STEPS, AROUND, 1),
    "vanilla-2L-scaled": row("scaled vanilla, 2L = 4 layers", VANILLA_2L, STEPS, [4e-3], 4, extend=False),
    "ponder-L": row("PonderLM-2, K = 1, from scratch", PONDER, STEPS, [4e-3], 4, extend=False),
}
for pct, s in SWITCH.items():
    ROWS[f"cut-{s}"] = row(f"the first {s} steps of vanilla-L-scaled", VANILLA, s, best_of("vanilla-L-scaled"), 2,
                           extend=False, table=False, lr_decay_iters=STEPS, warmup_iters=WARMUP, eval_interval=100)
    # the K = 1 phase; the longest was swept first, and its best (0.004) centred the shorter phases' first sweeps
    ROWS[f"retro-{pct}"] = row(f"scaled vanilla-L for {s} steps, then K = 1 for {STEPS - s}", PONDER, STEPS - s,
                               PHASE_LRS if pct == 50 else AROUND, 3, source=f"cut-{s}", seed=2,
                               warmup_iters=WARMUP)
    # --grad_passes=2 at the best lr of the same switch point without it (in the study both had the same best lr)
    ROWS[f"retro-{pct}-g2"] = row(f"as retro-{pct}, gradients through the last 2 passes", G2, STEPS - s,
                                  best_of(f"retro-{pct}"), 6, source=f"cut-{s}", seed=2, extend=False,
                                  warmup_iters=WARMUP)
# A second seed of the control and of every switch point (vanilla phase seed 3, K = 1 phase seed 4), at the rates
# the first seed chose: the differences that decide the reading are a few hundredths of a nat.
ROWS["vanilla-L-scaled-seed3"] = row("scaled vanilla, L = 2, seed 3", VANILLA, STEPS, best_of("vanilla-L-scaled"), 7,
                                     seed=3, extend=False)
for pct, s in SWITCH.items():
    ROWS[f"cut-{s}-seed3"] = row(f"the first {s} steps of vanilla-L-scaled-seed3", VANILLA, s,
                                 best_of("vanilla-L-scaled"), 7, seed=3, extend=False, table=False,
                                 lr_decay_iters=STEPS, warmup_iters=WARMUP, eval_interval=100)
    ROWS[f"retro-{pct}-seed4"] = row(f"as retro-{pct}, second seed (vanilla phase seed 3, K = 1 phase seed 4)", PONDER,
                                     STEPS - s, best_of(f"retro-{pct}"), 7, source=f"cut-{s}-seed3", seed=4,
                                     extend=False, warmup_iters=WARMUP)
# Without PonderLM-2's scale: a plain vanilla-L source, its scale kept (the default) or replaced by sqrt(2.5 d),
# at the cheapest switch point and at the lr found best for it with a scaled source.
ROWS["vanilla-L"] = row("plain vanilla, L = 2 (embeddings not scaled)", PLAIN, STEPS, [2e-3], 8, extend=False)
ROWS["cut-plain-1080"] = row("the first 1080 steps of vanilla-L", PLAIN, 1080, best_of("vanilla-L"), 8,
                             extend=False, table=False, lr_decay_iters=STEPS, warmup_iters=WARMUP, eval_interval=100)
ROWS["retro-10-plain"] = row("plain vanilla-L for 1080 steps, then K = 1 for 120, its scale (1) kept", PONDER, 120,
                             best_of("retro-10"), 8, source="cut-plain-1080", seed=2, extend=False,
                             warmup_iters=WARMUP)
ROWS["retro-10-plain-rescaled"] = row("plain vanilla-L for 1080 steps, then K = 1 for 120 with embeddings x "
                                      "sqrt(2.5d)", dict(PONDER, emb_scale="sqrt_2.5d"), 120, best_of("retro-10"), 8,
                                      source="cut-plain-1080", seed=2, extend=False, warmup_iters=WARMUP)


# ---- FLOPs ----------------------------------------------------------------------------------------------------

def model(options):
    keys = {f.name for f in fields(PonderConfig)}
    config = PonderConfig(vocab_size=256, block_size=128, n_head=4, n_embd=128,
                          **{k: v for k, v in options.items() if k in keys})
    return build("ponderlm2", config)


def train_flops(name):
    """Training FLOPs of a row, a retrofit row's vanilla phase included (the model's own count per token)."""
    r = ROWS[name]
    own = model(r["options"]).flops_per_token() * r["steps"] * TOKENS_PER_STEP
    return own + (train_flops(r["source"]) if r["source"] else 0)


# The vanilla controls given a retrofit row's training FLOPs: more steps, same schedule shape (warmup n/50), lr 0.004:
# the study's best for scaled vanilla-L at 1,200 and at 10,125 steps and for scaled vanilla-2L at 1,200 steps.
# vanilla-2L (about ponder-L's decode cost) at every switch point's FLOPs, and at those of retro-10-g2, the only
# --grad_passes=2 row below the cheapest of them (the others lie between two measured budgets); vanilla-L at
# retro-10's FLOPs only, which are less than every other retrofit row's.
MATCHED = {"vanilla-2L-scaled": ["retro-10", "retro-25", "retro-50", "retro-10-g2"], "vanilla-L-scaled": ["retro-10"]}
for base, names in MATCHED.items():
    options = ROWS[base]["options"]
    for name in names:
        n = round(train_flops(name) / (model(options).flops_per_token() * TOKENS_PER_STEP))
        ROWS[f"{base}@{name}"] = row(f"{ROWS[base]['what']}, {n} steps: the training FLOPs of {name}", options, n,
                                     [4e-3], 5, extend=False)


# ---- training (the sweep rule is the study's: the best lr must not sit at an edge of what was tried) ----------

def run_dir(name, lr):
    return (OUT / f"{name}_lr{lr:g}_s{ROWS[name]['seed']}").relative_to(REPO)      # train.py runs in REPO


def finished(out):
    return (out / "done.json").exists()


def sweep(name):
    """{lr: final val loss} of the finished runs of a row."""
    return {float(p.name.split("_lr")[1].split("_s")[0]): study.final_val(p)
            for p in OUT.glob(f"{name}_lr*_s{ROWS[name]['seed']}") if finished(p)}


def first_lrs(name):
    lrs = ROWS[name]["lrs"]
    return lrs() if callable(lrs) else lrs


def settled(name):
    """The best lr of a row once its sweep is complete (and, where it extends, the best is not at an edge)."""
    lrs, tried = first_lrs(name), sweep(name)
    if lrs is None or any(lr not in tried for lr in lrs):
        return None
    best, ordered = min(tried, key=tried.get), sorted(tried)
    lo, hi = study.LR_RANGE
    at_edge = best == ordered[0] and best / 2 >= lo or best == ordered[-1] and best * 2 <= hi
    return None if ROWS[name]["extend"] and at_edge else best


def wanted():
    """The runs that can start now: sweeps, then their extensions; a K = 1 phase once its source has finished."""
    jobs = []
    for name, r in ROWS.items():
        if r["source"] and settled(r["source"]) is None:
            continue
        lrs, tried = first_lrs(name), sweep(name)
        if lrs is None:
            continue
        missing = [lr for lr in lrs if lr not in tried]
        if missing:
            jobs += [(name, lr) for lr in missing]
        elif settled(name) is None:                    # the best lr is at an edge of the sweep: go one further
            best = min(tried, key=tried.get)
            jobs.append((name, best / 2 if best == min(tried) else best * 2))
    return jobs


def command(name, lr):
    r = ROWS[name]
    n = r["steps"]
    options = {**r["options"], "lr": f"{lr:g}", "seed": r["seed"], "max_iters": n, "warmup_iters": n // 50,
               "eval_interval": max(1, n // 12), **r["extra"], "out_dir": run_dir(name, lr)}
    if r["source"]:
        options["init_from"] = run_dir(r["source"], settled(r["source"])) / "ckpt.pt"
    return [*study.COMMON, *(f"--{k}={v}" for k, v in options.items())]


def train(name, lr):
    """Train one run to completion (train.py resumes a partial one). A run counts as finished when its log has the
    final evaluation, or when it diverged (an infinite loss). Each attempt's wall and CPU time go to times.jsonl."""
    out, args = run_dir(name, lr), command(name, lr)
    out.mkdir(parents=True, exist_ok=True)
    code = study.launch(["train.py", *args], out, "train.out", "times.jsonl")
    diverged = code == 1 and "diverged" in (out / "train.out").read_text()
    complete = (out / "log.jsonl").exists() and any(e["step"] == ROWS[name]["steps"] for e in study.evals(out))
    if not (diverged or complete):
        raise SystemExit(f"{out.name} did not finish (stopped, or failed: see {out / 'train.out'}); run again")
    (out / "done.json").write_text(json.dumps({"diverged": diverged}))


def run_all(jobs):
    """Keep `jobs` runs going, in row order (prio), longest first within a row, until nothing more is wanted."""
    study.schedule(jobs, lambda: sorted(wanted(), key=lambda j: (ROWS[j[0]]["prio"], -train_flops(j[0]))),
                   lambda job: train(*job))


# ---- results --------------------------------------------------------------------------------------------------

TABLE_ORDER = ["control", "retro", "retro-g2", "vanilla-L-scaled@", "vanilla-2L-scaled@", "plain"]


def kind(name):
    if "@" in name:
        return name.split("@")[0] + "@"
    if "plain" in name or name == "vanilla-L":
        return "plain"
    return "retro-g2" if name.endswith("-g2") else "retro" if name.startswith("retro") else "control"


def results(partial=False):
    """Every row with a settled lr (partial: every row with a finished run, at the best lr tried so far)."""
    res = {}
    for name, r in sorted(ROWS.items(), key=lambda kv: TABLE_ORDER.index(kind(kv[0]))):
        tried = sweep(name)
        lr = settled(name) or (min(tried, key=tried.get) if partial and tried else None)
        if not r["table"] or lr is None:
            continue
        out, m = run_dir(name, lr), model(r["options"])
        res[name] = dict(what=r["what"], options=r["options"], lr=lr, sweep=sweep(name), val=study.final_val(out),
                         steps=r["steps"], train_flops=train_flops(name),
                         decode_flops=m.flops_per_token(training=False), time=study.times(out),
                         curve=[(e["step"], e["val_loss"]) for e in study.evals(out)])
        if r["options"]["n_thoughts"]:
            res[name]["val_exact"] = study.exact_val(out)
        if r["source"]:                                # the vanilla phase: its run, and the loss at the switch
            src = run_dir(r["source"], settled(r["source"]))
            res[name].update(source=src.name, source_steps=ROWS[r["source"]]["steps"],
                             source_flops=train_flops(r["source"]), source_val=study.final_val(src),
                             source_time=study.times(src),
                             source_curve=[(e["step"], e["val_loss"]) for e in study.evals(src)])
    if {"vanilla-L-scaled", "ponder-L"} <= set(res):  # the share of ponder-L's from-scratch gain a row keeps
        lo, hi = res["ponder-L"]["val"], res["vanilla-L-scaled"]["val"]
        for name in res:
            if name.startswith("retro-") and "plain" not in name:
                res[name]["gain_kept"] = (hi - res[name]["val"]) / (hi - lo)
    return res


def report(res):
    lines = ["| row | what | steps | best lr (sweep: final val loss) | train FLOPs | decode FLOPs/token | "
             "val loss at the switch (vanilla / K = 1 added) | val loss (nats/token) | val loss, exact thoughts | "
             "share of ponder-L's gain | wall time, min (CPU) |", "|" + "---|" * 11]
    for name, r in res.items():
        sweep_ = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(r["sweep"].items()))
        steps = f"{r['source_steps']} + {r['steps']}" if "source" in r else f"{r['steps']}"
        switch = f"{r['source_val']:.3f} / {r['curve'][0][1]:.3f}" if "source" in r else ""
        took = f"{r['time'][0] / 60:.1f} ({r['time'][1] / 60:.1f})"
        if "source" in r:
            took += f" + {r['source_time'][0] / 60:.1f} ({r['source_time'][1] / 60:.1f}) vanilla"
        exact = f"{r['val_exact']:.3f}" if "val_exact" in r else "n/a"
        kept = f"{r['gain_kept']:.2f}" if "gain_kept" in r else ""
        lines.append(f"| {name} | {r['what']} | {steps} | {r['lr']:g} ({sweep_}) | {r['train_flops']:.2e} | "
                     f"{r['decode_flops'] / 1e6:.2f}M | {switch} | {r['val']:.3f} | {exact} | {kept} | {took} |")
    (REPO / "assets" / "retrofit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(res)


def figure(res):
    plt = study.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.8))
    for base, color in (("vanilla-L-scaled", "tab:blue"), ("vanilla-2L-scaled", "tab:green")):
        pts = sorted((r["train_flops"], r["val"]) for n, r in res.items() if n.split("@")[0] == base)
        left.plot(*zip(*pts), "o-", color=color, label=f"{base} (1,200 steps and FLOP-matched)")
    styles = {"ponder-L": ("*", "tab:red", 14)}
    for name, r in res.items():
        if name.startswith("retro-") or name == "ponder-L":
            marker, color, size = styles.get(name, ("s" if "plain" in name else "o" if "g2" in name else "D",
                                                    "tab:gray" if "plain" in name else
                                                    "tab:orange" if "g2" in name else "tab:purple", 8))
            left.plot(r["train_flops"], r["val"], marker, color=color, ms=size,
                      mfc="none" if "g2" in name else color)
            left.annotate(name, (r["train_flops"], r["val"]), xytext=(5, 4), textcoords="offset points", fontsize=7)
    left.set(xscale="log", xlabel="training FLOPs (vanilla phase included)", ylabel="final val loss (nats/token)",
             title="final loss against training compute\n(diamonds: retrofit; open circles: with --grad_passes=2)")
    left.legend(fontsize=8)
    for name, color in (("vanilla-L-scaled", "tab:blue"), ("vanilla-2L-scaled", "tab:green"), ("ponder-L", "tab:red"),
                        ("retro-10", "tab:purple"), ("retro-25", "tab:pink"), ("retro-50", "tab:brown")):
        if name not in res:                        # curves against training tokens: every row ends at 1,200 steps
            continue
        r = res[name]
        start = r.get("source_steps", 0)
        curve = r["curve"] if "source" in r else r["curve"][1:]      # from scratch: no step 0 (loss 5.5)
        xs, ys = zip(*[((start + s) * TOKENS_PER_STEP / 1e6, v) for s, v in curve])
        right.plot(xs, ys, "-", color=color, lw=1.3, label=name)
    right.set(xlabel="training tokens (millions)", ylabel="val loss (nats/token)", ylim=(1.2, 2.3),
              title="during training: a K = 1 phase starts with a jump")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(REPO / "assets" / "retrofit.png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description="Thoughts added late: trains what is missing (resumable), evaluates, "
                                            "writes assets/retrofit.md, .json and .png.")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with one thread (default 1)")
    p.add_argument("--report", action="store_true", help="train nothing: the report of the runs finished so far")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    os.chdir(REPO)                                 # run folders are named relative to the repository
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run_all(args.jobs)
    elif not any(OUT.glob("*/done.json")):              # nothing to report: keep the report there is
        p.error(f"no finished runs under {OUT.relative_to(REPO)}: run `python assets/retrofit.py` first "
                "(assets/retrofit.* are left as they are)")
    res = results(args.report)
    (REPO / "assets" / "retrofit.json").write_text(json.dumps(res, indent=1))
    report(res)


if __name__ == "__main__":
    main()
