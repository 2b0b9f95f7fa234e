"""
How many graphs torch.compile makes in a short train.py run, and how long compiling takes: the same run with and
without --compile=true, on the CPU (inductor, C++ code generation) unless --device says otherwise.

    python assets/compile_check.py --n_thoughts=1          # any train.py options; quick-start size by default

Prints one line: graphs, dynamo's own compile time, and the wall time of both runs. Inductor's on-disk caches
point to a fresh folder, so nothing compiled earlier is reused.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from torch._dynamo.utils import compilation_time_metrics, counters  # noqa: E402

import train  # noqa: E402


def run(args, compile):
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        train.main(["--device=cpu", "--max_iters=6", "--eval_interval=6", "--log_interval=6", *args,
                    f"--compile={compile}", f"--out_dir={out}", "--init_from=scratch"])
        return time.time() - t0


def main():
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    args = sys.argv[1:]
    eager = run(args, "false")
    torch._dynamo.reset()
    counters.clear()
    compilation_time_metrics.clear()
    compiled = run(args, "true")
    dynamo_s = sum(sum(v) for k, v in compilation_time_metrics.items() if k.endswith("compile_inner"))
    print(f"RESULT {' '.join(args)}: {counters['stats']['unique_graphs']} graphs, compile {dynamo_s:.0f} s by "
          f"dynamo's count; wall {compiled:.0f} s compiled vs {eager:.0f} s eager")


if __name__ == "__main__":
    main()
