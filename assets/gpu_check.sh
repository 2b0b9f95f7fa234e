#!/usr/bin/env bash
# The GPU check: what the CPU cannot show, in one run on one H100/H200 (about 5 to 6 minutes, estimated from
# its parts; BUDGET_S caps it). Run it from the repository root:
#
#     bash assets/gpu_check.sh                  # everything; output in $OUT (default ./gpu_check_out)
#     ONLY=k1,sample_exact bash assets/gpu_check.sh      # some steps (exact and sample_* need k1's checkpoint)
#
# Steps (each under its own timeout; a step is skipped when the overall budget BUDGET_S, default 500 s, is spent):
#   env      GPU, torch and CUDA versions
#   probe    at the CUDA default model size (6x384, block 256, batch 32), bf16 autocast, eager: dtypes of the
#            passes' inputs and outputs, SDPA calls, whether flash attention takes forward+backward (forced), the
#            attention kernels the profiler sees, activation memory, step time and MFU for K=0/1/2 at J=3
#   k1, k0   python train.py with the CUDA defaults (bf16, torch.compile, fused AdamW), 60 steps: tok/s, MFU,
#            val loss, peak memory, recompiles, graph breaks, compile time
#   big1     K=1 at GPT-2-small shape (12x768, block 1024, micro-batch 16), 20 steps
#   mb32, mb128   K=1 at the default size with micro-batch 32 and 128 (the default is 64)
#   exact    on k1's checkpoint: Jacobi passes and logit error of the exact prefill (fp32 and bf16) and of J=3
#            against token-by-token cached decoding in fp32
#   sample_exact, sample_jacobi   sample.py's decoding speed on k1's checkpoint, exact and Jacobi prefill
#   ddp      torchrun --nproc_per_node=1 (NCCL, DDP around the compiled blocks), K=1, J fixed to 3, 20 steps
#   eager    K=1 with --compile=false, 20 steps (what compile buys)
#   big0     K=0 at the big1 size
# Without CUDA every step runs as a tiny CPU smoke test (tiny model, no compile), to check the plumbing.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${BUDGET_S:-500}
ONLY=${ONLY:-}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$SUMMARY"; }

if [ ! -f train.py ] || [ ! -f ponder.py ]; then echo "run from the repository root" >&2; exit 2; fi
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$GPU" = 1 ]; then
  MODE=gpu
  TRAIN=(--init_from=scratch --eval_windows=320)                                # CUDA defaults otherwise
  K_STEPS=60; DDP_STEPS=20; EAGER_STEPS=20
else
  MODE=cpu
  TRAIN=(--init_from=scratch --device=cpu --compile=false --n_layer=2 --n_head=2 --n_embd=64 --block_size=64
         --micro_batch=4 --batch_tokens=512 --eval_windows=8 --warmup_iters=2)
  K_STEPS=4; DDP_STEPS=2; EAGER_STEPS=2
fi
say "mode: $MODE, budget ${BUDGET}s, output in $OUT"

# A step runs under `timeout`, capped by what is left of the budget; its output goes to $OUT/<name>.log.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 1; fi
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 20 ]; then say "SKIP $name: budget spent"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "START $name (timeout ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "END $name rc=$rc$( [ $rc = 124 ] && echo ' (TIMED OUT)')"
  return $rc
}

# What a train.py run printed: setup, the last training lines, evaluations, compile events, memory.
report_train() {
  local log="$OUT/$1.log"
  [ -f "$log" ] || return
  {
    echo "---- $1"
    grep -E "^(model|data|system):" "$log" | head -3
    grep -E "^step [0-9]+/" "$log" | tail -3
    grep -E "^step [0-9]+: " "$log" | tail -2
    echo "recompiles: $(grep -c 'Recompiling function' "$log"), graph breaks: $(grep -ci 'graph break' "$log")"
    grep -E "^(WALL_S|PEAK|DYNAMO_COUNTERS|COMPILE_S)" "$log"
    grep -E "^(error|Traceback)|Error:|DDPOptimizer|bucket" "$log" | head -5
  } | tee -a "$SUMMARY"
}

# ---------------------------------------------------------------------------------------------------------------
# helpers written into $OUT so that this script stays a single file

cat > "$OUT/run_train.py" <<'EOF'
"""train.main() with argv, then peak GPU memory, wall time and dynamo's counters (rank 0)."""
import os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import train
t0 = time.time()
try:
    train.main(sys.argv[1:])
except train.Fail as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
if int(os.environ.get("RANK", "0")) == 0:
    from torch._dynamo.utils import counters
    print("WALL_S", round(time.time() - t0, 1))
    if torch.cuda.is_available():
        print("PEAK_ALLOC_GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "PEAK_RESERVED_GiB", round(torch.cuda.max_memory_reserved() / 2**30, 2))
    print("DYNAMO_COUNTERS", {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "graph_break") and v})
    try:
        from torch._dynamo.utils import compilation_time_metrics as ctm
        fw, bw = ctm.get("_compile.compile_inner", []), ctm.get("backward._backward_impl", [])
        print("COMPILE_S", f"{len(fw)} graphs traced and compiled in {sum(fw):.1f} s, "
              f"{len(bw)} backward graphs compiled in {sum(bw):.1f} s")
    except Exception as e:
        print("COMPILE_S unavailable", e)
EOF

cat > "$OUT/probe.py" <<'EOF'
"""Eager probes at the CUDA default model size: dtypes, SDPA kernel choice, memory, speed."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import torch.nn.functional as F
import train
from ponder import PonderConfig, PonderLM

cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
res = {"torch": torch.__version__, "cuda": torch.version.cuda}
if cuda:
    p = torch.cuda.get_device_properties(0)
    res.update(device=torch.cuda.get_device_name(), capability=f"{p.major}.{p.minor}",
               memory_GiB=round(p.total_memory / 2**30, 1),
               bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
               bf16_supported_as_train_py_asks=torch.cuda.is_bf16_supported(),
               mfu_peak_used_by_train_py=train.peak_flops("cuda", "bfloat16"))
size = dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384) if cuda else \
    dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
B, T = (32, 256) if cuda else (2, 64)
ac = torch.autocast(dev, dtype=torch.bfloat16)
sync = torch.cuda.synchronize if cuda else (lambda: None)
idx = torch.randint(256, (B, T), device=dev)

# 1. dtypes under bf16 autocast: the embedding input, the thoughts fed back, SDPA's q/k/v and flags
torch.manual_seed(0)
m = PonderLM(PonderConfig(**size, n_thoughts=1)).to(dev).train()
seen = {"run": [], "sdpa": []}
real_run, real_sdpa = m.run, F.scaled_dot_product_attention
def run_spy(x, pos, cache=None):
    h = real_run(x, pos, cache)
    seen["run"].append((str(x.dtype), str(h.dtype), tuple(x.shape)))
    return h
def sdpa_spy(q, k, v, *a, **kw):
    seen["sdpa"].append(dict(dtype=str(q.dtype), q=tuple(q.shape), k=tuple(k.shape), last_dim_contiguous=
                             all(t.stride(-1) == 1 for t in (q, k, v)), is_causal=kw.get("is_causal", False),
                             mask=kw.get("attn_mask") is not None))
    return real_sdpa(q, k, v, *a, **kw)
m.run, F.scaled_dot_product_attention = run_spy, sdpa_spy
with ac:
    logits, loss = m(idx, idx, jacobi=3)
    cache_logits = list(m.generate(idx[:1, :8], max_new_tokens=3, temperature=0))
m.run, F.scaled_dot_product_attention = real_run, real_sdpa
res["passes_K1_J3"] = [s[2] for s in seen["run"][:6]]
res["dtype_pass_input_and_output"] = sorted({(a, b) for a, b, _ in seen["run"]})
res["dtype_logits_loss"] = [str(logits.dtype), str(loss.dtype)]
res["sdpa_kinds"] = sorted({json.dumps(s, sort_keys=True) for s in seen["sdpa"]})

# 2. will flash attention take these calls? forced forward+backward, then the kernels the profiler sees
if cuda:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, fn in [("train_fwd_bwd", lambda: m(idx, idx, jacobi=3)[1].backward()),
                     ("decode", lambda: list(m.generate(idx[:1, :8], max_new_tokens=3, temperature=0)))]:
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), ac:
                fn()
            res[f"flash_forced_{name}"] = "ok"
        except RuntimeError as e:
            res[f"flash_forced_{name}"] = "FAILS: " + str(e).splitlines()[0][:300]
    m.zero_grad(set_to_none=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with ac:
            m(idx, idx, jacobi=3)[1].backward()
        sync()
    res["attention_kernels_default"] = sorted({e.key[:90] for e in prof.key_averages()
                                               if any(s in e.key.lower() for s in ("flash", "fmha", "attention", "efficient"))})[:8]
    m.zero_grad(set_to_none=True)
del m

# 3. activation memory and eager speed for one micro-batch, fwd+bwd, J=3
peak = train.peak_flops("cuda", "bfloat16") if cuda else None
for K in (0, 1, 2):
    torch.manual_seed(0)
    m = PonderLM(PonderConfig(**size, n_thoughts=K)).to(dev).train()
    if cuda:
        sync(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    times = []
    for _ in range(4):
        t0 = time.time()
        with ac:
            _, loss = m(idx, idx, jacobi=3)
        loss.backward()
        m.zero_grad(set_to_none=True)
        sync()
        times.append(time.time() - t0)
    dt = min(times[1:])
    r = dict(step_s=round(dt, 4), tok_s=round(B * T / dt))
    if cuda:
        r["activation_peak_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
        r["mfu"] = round(m.flops_per_token(jacobi=3) * B * T / dt / peak, 3) if peak else None
    res[f"eager_fwd_bwd_K{K}_J3_B{B}"] = r
    del m
for k, v in res.items():
    print(f"{k}: {json.dumps(v, default=str)}")
EOF

cat > "$OUT/exact.py" <<'EOF'
"""Exact prefill on the device: passes and logit error against token-by-token cached decoding (fp32)."""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from ponder import KVCache, PonderConfig, PonderLM
ckpt_path = sys.argv[1]
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
if os.path.exists(ckpt_path):
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    m = PonderLM(PonderConfig(**ck["model_config"]))
    m.load_state_dict(ck["model"])
    source = f"{ckpt_path} (step {ck['step']}, val_loss {ck.get('val_loss')})"
else:
    m = PonderLM(PonderConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64, n_thoughts=1))
    source = "random init (no checkpoint)"
m = m.to(dev).eval()
T = min(m.config.block_size, 256)
val = os.path.join("data", "stdlib", "val.bin")
import numpy as np
data = np.memmap(val, dtype=np.uint16, mode="r")
idx = torch.from_numpy(np.stack([data[o:o + T].astype(np.int64) for o in (0, 100_000, 200_000, 300_000)])).to(dev)
K = m.config.n_thoughts
passes = []
real = m.run
m.run = lambda x, *a: passes.append(1) or real(x, *a)

def cached(autocast):
    cache = KVCache(T * (K + 1))
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        return torch.stack([m.step(idx[:, t], cache)[0] for t in range(T)], dim=1).float()

def full(jacobi, autocast):
    passes.clear()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        out = m(idx, jacobi=jacobi)[0].float()
    return out, len(passes)

ref = cached(False)
res = {"model": source, "tokens": T, "K": K}
for name, jac, ac in [("exact_fp32", "exact", False), ("exact_bf16", "exact", True), ("J3_fp32", 3, False),
                      ("J3_bf16", 3, True)]:
    out, n = full(jac, ac)
    res[name] = dict(passes=n, max_abs_logit_err=float((out - ref).abs().max()),
                     argmax_agree=float((out.argmax(-1) == ref.argmax(-1)).float().mean()))
res["cached_bf16_vs_fp32_max_abs_logit_err"] = float((cached(True) - ref).abs().max())
print(json.dumps(res, indent=1))
EOF

# ---------------------------------------------------------------------------------------------------------------
step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'" \
  && tail -3 "$OUT/env.log" | tee -a "$SUMMARY"
[ -f data/stdlib/meta.json ] || ONLY= step prepare 120 $PY data/prepare.py stdlib

step probe 100 $PY "$OUT/probe.py" && tail -60 "$OUT/probe.log" | tee -a "$SUMMARY"

step k1 200 env TORCH_LOGS=recompiles,graph_breaks $PY "$OUT/run_train.py" "${TRAIN[@]}" --n_thoughts=1 \
  --max_iters=$K_STEPS --eval_interval=$K_STEPS --log_interval=10 --out_dir="$OUT/k1"
report_train k1

step k0 90 env TORCH_LOGS=recompiles,graph_breaks $PY "$OUT/run_train.py" "${TRAIN[@]}" --n_thoughts=0 \
  --max_iters=$K_STEPS --eval_interval=$K_STEPS --log_interval=10 --out_dir="$OUT/k0"
report_train k0

if [ "$MODE" = gpu ]; then BIG=(--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --micro_batch=16 --batch_tokens=32768 --eval_windows=64 --warmup_iters=5); BIG_STEPS=20
else BIG=(--n_layer=2 --n_head=2 --n_embd=64 --block_size=128 --micro_batch=2 --batch_tokens=512 --eval_windows=4 --warmup_iters=2); BIG_STEPS=2; fi
step big1 130 env TORCH_LOGS=recompiles,graph_breaks $PY "$OUT/run_train.py" "${TRAIN[@]}" "${BIG[@]}" --n_thoughts=1 \
  --max_iters=$BIG_STEPS --eval_interval=$BIG_STEPS --log_interval=5 --out_dir="$OUT/big1"
report_train big1

for mb in 32 128; do
  step mb$mb 90 $PY "$OUT/run_train.py" "${TRAIN[@]}" --n_thoughts=1 --micro_batch=$([ $MODE = gpu ] && echo $mb || echo 2) \
    --max_iters=$K_STEPS --eval_interval=$K_STEPS --log_interval=10 --out_dir="$OUT/mb$mb"
  report_train mb$mb
done

if [ -f "$OUT/k1/ckpt.pt" ]; then
  step exact 60 $PY "$OUT/exact.py" "$OUT/k1/ckpt.pt" && tail -40 "$OUT/exact.log" | tee -a "$SUMMARY"
  for prefill in exact jacobi; do
    step "sample_$prefill" 45 $PY sample.py --out_dir="$OUT/k1" --num_samples=2 --max_new_tokens=500 \
      --temperature=0 --prefill=$prefill && grep -E "tokens/s|error" "$OUT/sample_$prefill.log" | tee -a "$SUMMARY"
  done
else
  say "SKIP exact, sample_exact, sample_jacobi: no k1 checkpoint in $OUT (run the k1 step first)"
fi
step ddp 150 env TORCH_LOGS=recompiles,graph_breaks,ddp_graphs $PY -m torch.distributed.run --standalone \
  --nproc_per_node=1 "$OUT/run_train.py" "${TRAIN[@]}" --n_thoughts=1 --jacobi_min=3 --jacobi_max=3 \
  --max_iters=$DDP_STEPS --eval_interval=$DDP_STEPS --log_interval=5 --out_dir="$OUT/ddp"
if [ -f "$OUT/ddp.log" ]; then               # DDPOptimizer's graph dumps are long: keep only their count
  say "ddp: graphs DDPOptimizer split: $(grep '__ddp_graphs' "$OUT/ddp.log" | grep -o '\[[0-9]*/[0-9]*\]' | sort | uniq | tr '\n' ' '); submodules in all: $(grep -c 'call_module\[target=submod_' "$OUT/ddp.log")"
  sed -i '/__ddp_graphs/d' "$OUT/ddp.log"
fi
report_train ddp

step eager 60 $PY "$OUT/run_train.py" "${TRAIN[@]}" --n_thoughts=1 --compile=false --max_iters=$EAGER_STEPS \
  --eval_interval=$EAGER_STEPS --log_interval=5 --out_dir="$OUT/eager"
report_train eager
step big0 80 env TORCH_LOGS=recompiles,graph_breaks $PY "$OUT/run_train.py" "${TRAIN[@]}" "${BIG[@]}" --n_thoughts=0 \
  --max_iters=$BIG_STEPS --eval_interval=$BIG_STEPS --log_interval=5 --out_dir="$OUT/big0"
report_train big0

rm -f "$OUT"/*/ckpt.pt                     # keep what comes back small: logs only
say "done in $(elapsed)s; summary in $SUMMARY"
