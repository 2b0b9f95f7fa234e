"""
What a training step and a generated token cost, for every method, at the quick-start size (4 layers, width 128,
4 heads, block 128, byte vocabulary padded to 256, micro-batch 8): the README's cost tables.

    python assets/cost.py             # FLOP table (instant), then measured steps for --grad_passes (a minute)
    python assets/cost.py --flops     # the FLOP table only

FLOPs are the models' own count (flops_per_token). Measured: the time of one training forward + backward of a
micro-batch (median over interleaved rounds, one thread), the activation memory kept for the backward pass (the
bytes of every tensor autograd saves, counted by a saved-tensors hook: exact and the same on any machine), and the
peak resident memory of a process that runs only that setting.
"""

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from baselines import build  # noqa: E402
from ponder import PonderConfig  # noqa: E402

SIZE = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)
B = 8
ROWS = [("vanilla", "ponderlm2", 0, {}), ("PonderLM-2", "ponderlm2", 1, {}),
        ("PonderLM-2, grad_passes=2", "ponderlm2", 1, dict(grad_passes=2)),
        ("PonderLM-2, grad_passes=1", "ponderlm2", 1, dict(grad_passes=1)), ("PonderLM-2", "ponderlm2", 2, {}),
        ("Pause", "pause", 1, {}), ("Pause", "pause", 3, {}), ("Loop", "loop", 1, {}), ("Loop", "loop", 3, {}),
        ("PonderLM", "ponderlm", 1, {}), ("PonderLM", "ponderlm", 3, {}),
        ("vanilla, 2x the layers", "ponderlm2", 0, dict(n_layer=8))]


def model(method, K, **kw):
    torch.manual_seed(0)
    return build(method, PonderConfig(**{**SIZE, "n_thoughts": K, **kw}))


def flops_table():
    base = model("ponderlm2", 0)
    t0, d0 = base.flops_per_token(), base.flops_per_token(training=False)
    print("| method | K | training MFLOP/token (J = 2-3) | x vanilla | decode MFLOP/token | x vanilla | "
          "KV entries per token and layer |")
    print("|---|---|---|---|---|---|---|")
    for name, method, K, kw in ROWS:
        m = model(method, K, **kw)
        t, d = m.flops_per_token(), m.flops_per_token(training=False)
        print(f"| {name} | {K} | {t / 1e6:.1f} | {t / t0:.1f} | {d / 1e6:.2f} | {d / d0:.2f} | {K + 1} |")


def saved_bytes(m, idx, J):
    """Bytes of the tensors autograd keeps for the backward of one training forward (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(idx, idx, jacobi=J)
    return sum(seen.values())


SETTINGS = [("vanilla", 0, 0), ("grad_passes=0 (all, the paper)", 1, 0), ("grad_passes=2", 1, 2),
            ("grad_passes=1", 1, 1)]


def peak_rss_mib():
    """This process's peak resident memory. Linux's VmHWM, since ru_maxrss carries the parent's over fork+exec."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def one_setting(i):
    """Run in a fresh process: a few steps of setting i only; print the peak resident memory growth in MiB."""
    _, K, g = SETTINGS[i]
    m = model("ponderlm2", K, grad_passes=g).train()
    idx = torch.randint(256, (B, 128), generator=torch.Generator().manual_seed(0))
    before = peak_rss_mib()
    for _ in range(3):
        m(idx, idx, jacobi=3)[1].backward()
    print(peak_rss_mib() - before)


def measure(rounds=int(os.environ.get("ROUNDS", 15))):
    torch.set_num_threads(1)
    idx = torch.randint(256, (B, 128), generator=torch.Generator().manual_seed(0))
    models = [model("ponderlm2", K, grad_passes=g).train() for _, K, g in SETTINGS]
    times = [[] for _ in SETTINGS]
    for r in range(rounds + 2):                    # settings take turns; the first two rounds warm up
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m(idx, idx, jacobi=3)[1].backward()
            m.zero_grad(set_to_none=True)
            if r >= 2:
                times[i].append(time.perf_counter() - t0)
    step = [statistics.median(t) for t in times]
    flops = [m.flops_per_token(jacobi=3) for m in models]
    print(f"\nK = 1, J = 3, one micro-batch of {B} x 128 tokens, median of {rounds} interleaved rounds, one thread:\n")
    print("| setting | step time | x vanilla | FLOPs x vanilla | activations saved for backward | peak RSS growth |")
    print("|---|---|---|---|---|---|")
    for i, (name, _, _) in enumerate(SETTINGS):
        rss = subprocess.run([sys.executable, __file__, "--one", str(i)], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip()
        print(f"| {name} | {step[i] * 1e3:.0f} ms | {step[i] / step[0]:.2f} | {flops[i] / flops[0]:.2f} | "
              f"{saved_bytes(models[i], idx, 3) / 2**20:.0f} MiB | {float(rss):.0f} MiB |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        one_setting(int(sys.argv[2]))
    else:
        flops_table()
        if "--flops" not in sys.argv:
            measure()
