"""
Where does a latent thought help? State tracking on a group word problem (docs/state_tracking.md).

Every arm reads words of group elements and names, after each one, the product of the elements so far (data/groups.py).
A5 is non-solvable: a fixed-depth transformer cannot track its state at every length, a recurrent network can. Z60
is an abelian control of the same size. With exact thoughts a PonderLM-2 model is recurrent (a thought feeds every
later token's slots); trained with J Jacobi passes, a thought only ever saw a chain of about J + 1 earlier ones.
The arms: vanilla models of 2, 4 and 8 layers; PonderLM-2 (K = 1, 2 layers) trained with J in {2, 3}, with J = 8,
and with exact thoughts (J = T - 1 passes, gradients through all of them or through the last 2); Loop and Pause
(K = 3, 2 layers).

    python assets/state_tracking.py                   # data, training (resumable), evaluation, report
    python assets/state_tracking.py --report_only     # the report of the runs finished so far
    python assets/state_tracking.py --evaluate=study/state/a5/ponder-J23_lr0.01_s1      # one run's evaluation

Datasets go to data/<group>_<T>_k<letters>/, runs to study/state/<group>/<arm>_lr<lr>_s<seed>/ (both ignored by
git), each a plain `python train.py ...` whose command is printed, two at a time with one thread each
(OMP_NUM_THREADS=1). Each arm's learning rate is swept on A5 with seed 1 (extended while the best is at an edge);
the best is then run with a second seed where listed, and on Z60 for the control arms. Kill it at any time and run
it again: finished runs are kept, a cut-short run resumes from its checkpoint, an evaluation is kept in its run's
eval.json once made. The report: markdown tables printed and written to assets/state_tracking.md, the results in
assets/state_tracking.json, the figure in assets/state_tracking.png (skipped without matplotlib).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import study  # noqa: E402   (assets/study.py: launching runs, the scheduler, the figures' pyplot)
from baselines import build  # noqa: E402
from common import RunDir  # noqa: E402
from data import groups  # noqa: E402
from ponder import PonderConfig  # noqa: E402

OUT = REPO / "study" / "state"
T = 16                                   # trained length: one sequence per window (--block_size=T)
LETTERS = 4                              # inputs are drawn from 4 elements of the group (data/groups.py --letters)
TRAIN_SEQS, VAL_SEQS, DATA_SEED = 200_000, 2_000, 0
EVAL_SEED = 1                            # fresh test words, from another seed than the training data
EVAL_LENGTHS = {T: 1000, 2 * T: 500, 4 * T: 250}     # test length: number of test words
J_SWEEP = list(range(T)) + ["exact"]     # Jacobi passes in the accuracy-against-J sweep at the trained length
EVAL_VERSION = 2                         # an eval.json of another version is made again
STEPS, TOKENS_PER_STEP = 2000, 512
COMMON = ["--n_embd=64", "--n_head=4", f"--block_size={T}", f"--batch_tokens={TOKENS_PER_STEP}",
          f"--micro_batch={TOKENS_PER_STEP // T}", "--eval_windows=500", "--log_interval=50", "--device=cpu",
          f"--max_iters={STEPS}", f"--warmup_iters={STEPS // 50}", f"--eval_interval={STEPS // 15}"]
VANILLA = dict(n_thoughts=0, emb_scale="sqrt_2.5d")
EXACT = dict(jacobi_min=T - 1, jacobi_max=T - 1, jacobi_eval=T - 1)   # K + (T-1) K passes: every thought exact
SWEEP, ONE = [1e-3, 3e-3, 1e-2], [3e-3]    # a sweep is extended by factors of 3 while its best is at an edge
LR_RANGE = (3e-4, 3e-2)                    # ... but never beyond these
ARMS = {   # name: (what, train.py options, learning rates tried with seed 1 (or the arm whose best rate is taken),
           #        seeds run at the best of them)
    "vanilla-L": ("vanilla, 2 layers", dict(n_layer=2, **VANILLA), SWEEP, [1, 2]),
    "vanilla-2L": ("vanilla, 4 layers", dict(n_layer=4, **VANILLA), SWEEP, [1, 2]),
    "vanilla-4L": ("vanilla, 8 layers", dict(n_layer=8, **VANILLA), SWEEP, [1, 2]),
    "ponder-J23": ("PonderLM-2 K=1, J in {2,3} (the default)", dict(n_layer=2, n_thoughts=1), SWEEP, [1, 2]),
    "ponder-J8": ("PonderLM-2 K=1, J = 8", dict(n_layer=2, n_thoughts=1, jacobi_min=8, jacobi_max=8, jacobi_eval=8),
                  ONE, [1]),
    "ponder-exact": (f"PonderLM-2 K=1, exact thoughts (J = {T - 1})", dict(n_layer=2, n_thoughts=1, **EXACT), ONE,
                     [1]),
    "ponder-exact-g2": (f"PonderLM-2 K=1, exact thoughts (J = {T - 1}), gradients through the last 2 passes",
                        dict(n_layer=2, n_thoughts=1, grad_passes=2, **EXACT), ONE, [1, 2]),
    # the vanilla models again with 4 times the steps, at the best rate of their sweep: do they plateau?
    "vanilla-L-long": (f"vanilla, 2 layers, {4 * STEPS} steps", dict(n_layer=2, **VANILLA, max_iters=4 * STEPS),
                       "vanilla-L", [1]),
    "vanilla-2L-long": (f"vanilla, 4 layers, {4 * STEPS} steps", dict(n_layer=4, **VANILLA, max_iters=4 * STEPS),
                        "vanilla-2L", [1]),
    "vanilla-4L-long": (f"vanilla, 8 layers, {4 * STEPS} steps (twice ponder-J23's training FLOPs)",
                        dict(n_layer=8, **VANILLA, max_iters=4 * STEPS), "vanilla-4L", [1]),
    "loop-K3": ("Loop K=3 (2 layers run 4 times)", dict(n_layer=2, n_thoughts=3, method="loop"), SWEEP, [1, 2]),
    "pause-K3": ("Pause K=3", dict(n_layer=2, n_thoughts=3, method="pause"), SWEEP, [1, 2]),
    # Loop again with twice the steps, at the best rate of its sweep: ponder-J23's training FLOPs
    "loop-K3-long": (f"Loop K=3, {2 * STEPS} steps (ponder-J23's training FLOPs)",
                     dict(n_layer=2, n_thoughts=3, method="loop", max_iters=2 * STEPS), "loop-K3", [1]),
}
MAIN, CONTROL = "A5", "Z60"
CONTROL_ARMS = ["vanilla-L", "ponder-J23"]     # at the main group's best lr, seed 1


def dataset(group):
    return REPO / "data" / f"{group.lower()}_{T}_k{LETTERS}"


def run_dir(group, arm, lr, seed):
    return OUT / group.lower() / f"{arm}_lr{lr:g}_s{seed}"


def prepare_data():
    for group in (MAIN, CONTROL):
        if not (dataset(group) / "meta.json").exists():
            groups.prepare(group, T, TRAIN_SEQS, VAL_SEQS, DATA_SEED, LETTERS, dataset(group))


# ---- training -------------------------------------------------------------------------------------------------

def command(group, arm, lr, seed):
    options = [f"--{k}={v}" for k, v in ARMS[arm][1].items()]
    return ["train.py", f"--dataset={dataset(group).relative_to(REPO)}", *COMMON, *options, f"--lr={lr:g}",
            f"--seed={seed}", f"--out_dir={run_dir(group, arm, lr, seed).relative_to(REPO)}"]


def train_and_evaluate(job):
    """Train one run to completion (train.py resumes a partial one), then evaluate it. The wall and CPU time of
    each attempt is appended to times.jsonl (training) or eval_times.jsonl."""
    out = run_dir(*job)
    out.mkdir(parents=True, exist_ok=True)
    for done, args, name in [(lambda: (out / "done.json").exists(), command(*job), "train"),
                             (lambda: finished(job), [Path(__file__).relative_to(REPO),
                                                      f"--evaluate={out.relative_to(REPO)}"], "eval")]:
        if done():
            continue
        code = study.launch(args, out, f"{name}.out", "times.jsonl" if name == "train" else "eval_times.jsonl")
        if code:
            raise SystemExit(f"{out}: {name} failed (exit {code}): see {out / name}.out")
        if name == "train":
            if final_step(out) != steps(job[1]):       # train.py also exits cleanly when stopped by a signal
                raise SystemExit(f"{out} stopped at step {final_step(out)} of {steps(job[1])}: run this script again")
            (out / "done.json").write_text("{}")


def steps(arm):
    return ARMS[arm][1].get("max_iters", STEPS)


def final_step(out):
    return max((e["step"] for e in RunDir(out).entries() if "val_loss" in e), default=0)


def finished(job):
    path = run_dir(*job) / "eval.json"
    return path.exists() and json.loads(path.read_text()).get("version") == EVAL_VERSION


def final_val(job):
    entries = [e for e in RunDir(run_dir(*job)).entries() if "val_loss" in e and not e.get("eval_only")]
    return entries[-1]["val_loss"]


def lrs(arm):
    """The learning rates of an arm's sweep (seed 1, main group): its list, extended by a factor of 3 beyond the
    edge where the best final val loss sits, as long as the sweep is complete, the best is at an edge, and the next
    rate is within LR_RANGE. An arm with one rate is not swept."""
    if isinstance(ARMS[arm][2], str):                   # another arm's best rate, once known
        lr = best_lr(ARMS[arm][2])
        return [] if lr is None else [lr]
    tried = list(ARMS[arm][2])
    while len(tried) > 1 and all(finished((MAIN, arm, lr, 1)) for lr in tried):
        best = min(tried, key=lambda lr: final_val((MAIN, arm, lr, 1)))
        if best == tried[-1] and best * 3 <= LR_RANGE[1] * 1.001:
            tried.append(round(best * 3, 10))
        elif best == tried[0] and best / 3 >= LR_RANGE[0] * 0.999:
            tried.insert(0, round(best / 3, 10))
        else:
            break
    return tried


def best_lr(arm, partial=False):
    """The learning rate of an arm with the lowest final val loss on the main group (seed 1), once all are done
    (partial: among those done)."""
    jobs = [(MAIN, arm, lr, 1) for lr in lrs(arm)]
    done = [j for j in jobs if finished(j)]
    if not done or len(done) < len(jobs) and not partial:
        return None
    return min(done, key=final_val)[2]


def plan():
    """Every run wanted, as far as known now: the sweeps, then (once an arm's sweep is done) its other seeds and
    its control-group run at the best learning rate."""
    jobs = []
    for arm in ARMS:
        jobs += [(MAIN, arm, lr, 1) for lr in lrs(arm)]
        lr = best_lr(arm)
        if lr is not None:
            jobs += [(MAIN, arm, lr, s) for s in ARMS[arm][3][1:]] + [(CONTROL, arm, lr, 1)] * (arm in CONTROL_ARMS)
    return jobs


def run_all(jobs):
    """Keep `jobs` runs going, the sweeps first and the most expensive first, until every run is done."""
    study.schedule(jobs, lambda: sorted((j for j in plan() if not finished(j)), key=priority), train_and_evaluate)


def priority(job):
    """The order of the runs, so that a study cut short has the most telling ones: every arm at lr 3e-3 on the main
    group, the rest of the sweeps, the second seeds of the decisive arms, the control group, the other second
    seeds; the most expensive first within each."""
    group, arm, lr, seed = job
    decisive = arm in ("vanilla-4L", "ponder-J23", "ponder-exact-g2")
    tier = 3 if group != MAIN else 0 if seed == 1 and lr == 3e-3 else 1 if seed == 1 else 2 if decisive else 4
    return tier, -cost(arm) * steps(arm)


def cost(arm):
    """Training FLOPs per token, to start the longest runs first."""
    options = ARMS[arm][1]
    config = PonderConfig(vocab_size=64, block_size=T, n_head=4, n_embd=64,
                          **{k: v for k, v in options.items() if k not in ("method", "max_iters")})
    return build(options.get("method", "ponderlm2"), config).flops_per_token()


# ---- evaluation -----------------------------------------------------------------------------------------------

def load_model(out, block_size):
    """A trained run's model, with rotary tables for block_size tokens (longer than trained: unseen positions)."""
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    config = PonderConfig(**{**ckpt["model_config"], "block_size": block_size})
    model = build(ckpt.get("method", "ponderlm2"), config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@torch.no_grad()
def predictions(model, x, jacobi, batch=250):
    """Argmax predictions (n, L) and logits of the words x (n, L), in batches."""
    preds, logits = [], []
    for i in range(0, len(x), batch):
        out, _ = model(torch.from_numpy(x[i:i + batch]), jacobi=jacobi)
        preds.append(out.argmax(-1))
        logits.append(out)
    return torch.cat(preds).numpy(), torch.cat(logits)


def test_words(group, meta, length):
    g = groups.group(group)
    x = groups.words(g, EVAL_LENGTHS[length], length, EVAL_SEED, stream=length, letters=meta["letters"])
    return x, groups.prefix_products(g, x)


def measure(model, x, y, modes, sweep=()):
    """What evaluate records for one model on test words x (n, L) with states y (n, L), by position: the accuracy for
    each Jacobi mode (a number of passes, or "exact"), over all words and over the words whose first two letters
    differ; for each J of sweep, the accuracy and the largest logit difference from exact thoughts (relative); and
    passes_to_exact, the smallest J of sweep whose argmax predictions equal exact thoughts' on every position of
    every word (absent if none does)."""
    res = {"accuracy": {}, "accuracy_distinct_start": {}}
    distinct = x[:, 0] != x[:, 1]
    for mode in modes:
        right = predictions(model, x, mode)[0] == y
        res["accuracy"][mode] = right.mean(0).tolist()
        res["accuracy_distinct_start"][mode] = right[distinct].mean(0).tolist()
    if sweep:
        exact_pred, exact_logits = predictions(model, x, "exact")
        res["sweep"], res["logit_gap"] = {}, {}
        for J in sweep:
            pred, logits = predictions(model, x, J)
            res["sweep"][str(J)] = (pred == y).mean(0).tolist()
            res["logit_gap"][str(J)] = float((logits - exact_logits).abs().max() / exact_logits.abs().max())
            if "passes_to_exact" not in res and (pred == exact_pred).all():
                res["passes_to_exact"] = J
    return res


def evaluate(out):
    """Accuracy by position of one run on fresh test words of every length, with J = 3 and with exact thoughts (one
    forward for the models without thoughts): over all test words, and over those whose first two letters differ.
    (A transformer without absolute positions cannot tell the words a, aa, aaa, ... apart: every slot of such a
    prefix sees the same values. Vanilla and Loop models therefore fail on the 1/4 of words that start with a
    repeated letter, at position 2, whatever their depth; thought and pause slots break that symmetry.)
    At the trained length also for every J of J_SWEEP, and the number of Jacobi passes after which the argmax
    predictions equal those of exact thoughts at every position of every test word. Written to out/eval.json."""
    torch.set_num_threads(1)
    group = out.parent.name.upper()
    meta = json.loads((dataset(group) / "meta.json").read_text())
    _, ckpt = load_model(out, T)
    thinks = ckpt.get("method", "ponderlm2") == "ponderlm2" and ckpt["model_config"]["n_thoughts"] > 0
    modes = [3, "exact"] if thinks else ["exact"]
    res = {"version": EVAL_VERSION, "accuracy": {}, "accuracy_distinct_start": {}, "chance": {}}
    for length in EVAL_LENGTHS:
        t0 = time.time()
        model, _ = load_model(out, length)
        x, y = test_words(group, meta, length)
        res["chance"][length] = [float(np.bincount(y[:, t]).max() / len(y)) for t in range(length)]
        m = measure(model, x, y, modes, J_SWEEP if thinks and length == T else ())
        for key in ("accuracy", "accuracy_distinct_start"):
            res[key].update({f"{mode}@{length}": acc for mode, acc in m.pop(key).items()})
        res.update(m)
        print(f"{out.name}: length {length}: mean accuracy " + ", ".join(
            f"{np.mean(res['accuracy'][f'{mode}@{length}']):.4f} (J={mode})" for mode in modes)
            + f" ({time.time() - t0:.0f} s)", flush=True)
    (out / "eval.json").write_text(json.dumps(res))


# ---- the report -----------------------------------------------------------------------------------------------

def horizon(acc, level=0.9):
    """How many leading positions a run tracks: the first position (1-based) whose accuracy is below level, minus 1."""
    below = [i for i, a in enumerate(acc) if a < level]
    return below[0] if below else len(acc)


def results(partial=False):
    """Every run at its arm's best learning rate, with its evaluation; and each arm's sweep (lr: final val loss).
    partial: of the runs finished so far (the best learning rate among those tried so far), naming those missing."""
    runs, sweeps, missing = {}, {}, []
    for arm in ARMS:
        sweeps[arm] = {lr: final_val((MAIN, arm, lr, 1)) for lr in lrs(arm) if finished((MAIN, arm, lr, 1))}
    for arm in ARMS:
        lr = best_lr(arm, partial)
        wanted = [(MAIN, arm, l, 1) for l in lrs(arm)]
        if lr is not None:
            wanted += [(MAIN, arm, lr, s) for s in ARMS[arm][3][1:]] + [(CONTROL, arm, lr, 1)] * (arm in CONTROL_ARMS)
        missing += [run_dir(*j).relative_to(OUT).as_posix() for j in wanted if not finished(j)]
    for group, arm, lr, seed in sorted(plan(), key=lambda j: (j[0] != MAIN, list(ARMS).index(j[1]), j[3])):
        if lr != best_lr(arm, partial) or not finished((group, arm, lr, seed)):
            continue
        out = run_dir(group, arm, lr, seed)
        entries = [e for e in RunDir(out).entries() if "val_loss" in e and not e.get("eval_only")]
        ev = json.loads((out / "eval.json").read_text())
        runs[out.relative_to(OUT).as_posix()] = dict(
            group=group, arm=arm, what=ARMS[arm][0], lr=lr, seed=seed,
            command="OMP_NUM_THREADS=1 python " + " ".join(str(a) for a in command(group, arm, lr, seed)),
            val_loss=entries[-1]["val_loss"], curve=[(e["step"], round(e["val_loss"], 4)) for e in entries],
            time=study.times(out), **{k: rounded(v) for k, v in ev.items()})
    return dict(setup=dict(T=T, letters=LETTERS, train_seqs=TRAIN_SEQS, val_seqs=VAL_SEQS, data_seed=DATA_SEED,
                           eval_seed=EVAL_SEED, eval_words=EVAL_LENGTHS, steps=STEPS, tokens_per_step=TOKENS_PER_STEP,
                           common=COMMON, letters_of={g: json.loads((dataset(g) / "meta.json").read_text())["letters"]
                                                      for g in (MAIN, CONTROL)}),
                sweeps=sweeps, runs=runs, missing=missing)


def rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [rounded(x) for x in v]
    return v


def mean(values):
    return sum(values) / len(values)


def report(res):
    L = max(EVAL_LENGTHS)
    lines = [f"| group | arm | lr (sweep: final val loss) | seed | val loss at 2/3 of training, end | "
             f"accuracy 1-{T} (J=3 / exact) | "
             f"{T + 1}-{2 * T} | {2 * T + 1}-{L} | tracks up to (J=3 / exact) | passes to exact | "
             f"train FLOPs | training wall (CPU) min |", "|" + "---|" * 12]
    for r in res["runs"].values():
        modes = [m for m in ("3", "exact") if f"{m}@{L}" in r["accuracy"]]

        def cell(lo, hi, length):
            return " / ".join(f"{mean(r['accuracy'][f'{m}@{length}'][lo:hi]):.3f}" for m in modes)
        tracks = " / ".join(str(horizon(r["accuracy_distinct_start"][f"{m}@{L}"])) for m in modes)
        sweep = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res["sweeps"][r["arm"]].items()) \
            if r["group"] == MAIN else f"{MAIN}'s best"
        wall, cpu = r["time"]
        two_thirds = min(r["curve"], key=lambda e: abs(e[0] - 2 * steps(r["arm"]) / 3))[1]
        lines.append(f"| {r['group']} | {r['arm']} | {r['lr']:g} ({sweep}) | {r['seed']} | "
                     f"{two_thirds:.3f}, {r['val_loss']:.3f} | "
                     f"{cell(0, T, T)} | {cell(T, 2 * T, 2 * T)} | {cell(2 * T, L, L)} | {tracks} | "
                     f"{r.get('passes_to_exact', 'n/a')} | {cost(r['arm']) * steps(r['arm']) * TOKENS_PER_STEP:.1e} | "
                     f"{wall / 60:.0f} ({cpu / 60:.0f}) |")
    sweep = ["| group | arm | seed | " + " | ".join(f"J={J}" for J in J_SWEEP) + " |",
             "|" + "---|" * (3 + len(J_SWEEP))]
    for r in res["runs"].values():
        if "sweep" in r:
            sweep.append(f"| {r['group']} | {r['arm']} | {r['seed']} | "
                         + " | ".join(f"{mean(r['sweep'][str(J)]):.2f} ({horizon(r['sweep'][str(J)])})"
                                      for J in J_SWEEP) + " |")
    if res["missing"]:
        lines.append(f"\nNot run (the study was cut short): {', '.join(res['missing'])}")
    text = "\n".join(lines) + f"\n\nMean accuracy over positions 1-{T} (and how many leading positions reach " \
        "90 %) against the number of Jacobi passes J at evaluation:\n\n" \
        + "\n".join(sweep) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (REPO / "assets" / "state_tracking.md").write_text(text)
    print(text)
    figure(res["runs"])


def figure(res):
    plt = study.pyplot()
    if plt is None:
        return
    L = max(EVAL_LENGTHS)
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    colors = dict(zip(ARMS, plt.get_cmap("tab20").colors))       # one colour per arm (12)
    for ax, group in zip(axes[0], ("A5", "Z60")):
        chance = None
        for r in res.values():
            if r["group"] != group or r["seed"] != 1:
                continue
            pos = range(1, L + 1)
            acc = r["accuracy_distinct_start"]
            ax.plot(pos, acc[f"exact@{L}"], "-", color=colors[r["arm"]], label=r["arm"], lw=1.3)
            if f"3@{L}" in acc:
                ax.plot(pos, acc[f"3@{L}"], ":", color=colors[r["arm"]], lw=1.3)
            chance = r["chance"][str(L)]
        if chance:
            ax.plot(range(1, L + 1), chance, "-", color="grey", lw=3, alpha=0.4, label="most frequent state")
        ax.axvline(T + 0.5, color="black", lw=0.8)
        ax.set(xlabel="position", ylabel="accuracy", ylim=(-0.02, 1.02),
               title=f"{group}: accuracy by position, seed 1, words whose first two letters differ\n"
                     "(solid: exact thoughts, dotted: J = 3)")
        ax.text(T + 1, 0.97, "longer than trained ->", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[1][0]
    for r in res.values():
        if "sweep" in r and r["group"] == "A5":
            Js = [J for J in J_SWEEP if J != "exact"]
            ax.plot(Js, [mean(r["sweep"][str(J)]) for J in Js], "o-" if r["seed"] == 1 else "o--",
                    color=colors[r["arm"]], label=f"{r['arm']} s{r['seed']}", ms=3)
            ax.axhline(mean(r["sweep"]["exact"]), color=colors[r["arm"]], lw=0.6, ls=":")
    ax.set(xlabel="Jacobi passes J at evaluation", ylabel=f"mean accuracy, positions 1-{T}",
           title="A5: accuracy against J at the trained length (dotted: exact thoughts)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for r in res.values():
        if r["group"] == "A5":
            steps, loss = zip(*r["curve"][1:])
            ax.plot(steps, loss, "-" if r["seed"] == 1 else "--", color=colors[r["arm"]],
                    label=r["arm"] if r["seed"] == 1 else None, lw=1.2)
    ax.set(xlabel="step", ylabel="val loss (nats per position)", yscale="log",
           title="A5: val loss during training, at each arm's training J (dashed: seed 2)")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(REPO / "assets" / "state_tracking.png", dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description="State tracking on group word problems: train, evaluate, report.")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2), each with one thread")
    p.add_argument("--evaluate", metavar="RUN_DIR", help="evaluate one finished run into its eval.json, and exit")
    p.add_argument("--report_only", action="store_true", help="train nothing: report the runs finished so far")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.evaluate:
        return evaluate(Path(args.evaluate).resolve())
    if not args.report_only:
        prepare_data()
        run_all(args.jobs)
    elif not any(OUT.glob("*/*/eval.json")):            # nothing to report: keep the report there is
        p.error(f"no evaluated runs under {OUT.relative_to(REPO)}: run `python assets/state_tracking.py` first "
                "(assets/state_tracking.* are left as they are)")
    res = results(partial=args.report_only)
    (REPO / "assets" / "state_tracking.json").write_text(json.dumps(res) + "\n")
    report(res)


if __name__ == "__main__":
    main()
