#!/usr/bin/env bash
# Everything a GPU machine should run, in one command (docs/design.md section 6):
#
#     scripts/gpu_check.sh OUT_DIR
#
# On a machine with a CUDA GPU, its own torch (2.11) and Triton (3.6), and no network, it
#   1. records the environment (GPU, driver, versions, git commit),
#   2. builds the package in place for this GPU's architecture only
#      (pip install --no-build-isolation --no-deps -e ., TORCH_CUDA_ARCH_LIST=<this GPU>),
#   3. runs the whole test suite, `gpu` tests included (Triton autotuning off: each candidate
#      configuration is checked by test_every_gpu_config instead of tuning every test shape),
#      one process per test file (scripts/gpu_tests.sh), then scripts/triton_triage.py,
#   4. runs compute-sanitizer memcheck on one small case per GPU backend, and racecheck,
#      synccheck and memcheck on the `cuda` backend's cases (scripts/gpu_check_cuda.sh), where
#      compute-sanitizer is present,
#   5. runs the benchmark CLI on the GPU shapes (python -m benchmarks --preset gpu),
#   6. runs the Triton head-dim caps sweep (scripts/triton_sweep.py),
# and writes every log and table into OUT_DIR, with OUT_DIR/summary.txt listing each step's
# status and time, and OUT_DIR/bundle.tgz holding all of it. Every step has its own timeout
# and a failing step never stops the next one. The whole run has a budget (GPU_CHECK_TOTAL, default 540 s): a step's limit is cut to
# what is left of it, and steps that no longer fit are skipped and listed as such. Override a
# step's own limit with GPU_CHECK_TIMEOUT_<STEP>=seconds (e.g. GPU_CHECK_TIMEOUT_BENCH=300).
#
# Environment: PYTHON (default: python3), GPU_CHECK_SKIP (space-separated step names to skip,
# e.g. "build" when the package is already built), NONLOCAL_KERNELS_EMU (default 0: the emulated CUDA
# extension is for CPU-only CI; set 1 to build and test it here too).
set -u

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL:-540}
FAILED=0
STEP_NO=0

export NONLOCAL_KERNELS_EMU=${NONLOCAL_KERNELS_EMU:-0}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
# nvcc, compute-sanitizer and cuobjdump live here on a stock CUDA install.
export PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"

echo "gpu_check: $ROOT -> $OUT ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))" | tee "$SUMMARY"

# run_step NAME TIMEOUT_SECONDS COMMAND...  (log: OUT/NN-NAME.log; status appended to summary)
run_step() {
    local name=$1 limit=$2
    shift 2
    local var="GPU_CHECK_TIMEOUT_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
    limit=${!var:-$limit}
    local left=$((TOTAL - ($(date +%s) - START)))
    STEP_NO=$((STEP_NO + 1))
    case " ${GPU_CHECK_SKIP:-} " in
        *" $name "*)
            echo "== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$SUMMARY"
            return 0
            ;;
    esac
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED (only ${left}s of the ${TOTAL}s budget left)" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log
    log="$OUT/$(printf '%02d' "$STEP_NO")-$name.log"
    local t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    {
        echo "\$ $*"
        echo
    } >"$log"
    timeout -k 15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    printf '   %-14s %-26s %5ss  log: %s\n' "$name" "$status" "$(($(date +%s) - t0))" \
        "$(basename "$log")" | tee -a "$SUMMARY"
    tail -n 3 "$log" | sed 's/^/   | /' | tee -a "$SUMMARY"
    return 0
}

# 1. environment -------------------------------------------------------------------------
env_info() {
    echo "host: $(hostname)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --short 2>/dev/null | wc -l) changed files"
    nvidia-smi || echo "(no nvidia-smi)"
    command -v nvcc >/dev/null && nvcc --version
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm_%d%d" % (p.major, p.minor), "%.1f GiB" % (p.total_memory / 2**30))
EOF
}
export -f env_info
export PY ROOT
run_step env 60 bash -c env_info

# The arch of the GPU present, e.g. 9.0 (falls back to the build's own default when unknown).
ARCH=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null)
if [ -n "$ARCH" ]; then
    export TORCH_CUDA_ARCH_LIST=$ARCH
    echo "   TORCH_CUDA_ARCH_LIST=$ARCH" | tee -a "$SUMMARY"
else
    echo "   could not read the GPU's compute capability (is there a GPU?)" | tee -a "$SUMMARY"
fi

# 2. build -------------------------------------------------------------------------------
run_step build 150 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
run_step import 60 "$PY" -c 'import nonlocal_kernels as nk, json
print(nk.__file__)
for b in nk.available_backends():
    print(json.dumps({k: b[k] for k in ("name", "available", "reason", "devices", "priority")}))'

# 3. tests (gpu tests included; they run automatically when CUDA is present), one process per
#    test file (scripts/gpu_tests.sh): a crash or an illegal memory access ends a process and
#    its CUDA context, and would otherwise fail every later test for that reason alone. -----
run_step tests 240 env NONLOCAL_KERNELS_TRITON_AUTOTUNE=0 NONLOCAL_KERNELS_POISON=1 \
    bash scripts/gpu_tests.sh "$OUT/tests" "$PY"
run_step triton-triage 120 "$PY" scripts/triton_triage.py --out "$OUT/triton_triage.md"

# 4. compute-sanitizer (memcheck) on one small case per GPU backend -------------------------
if command -v compute-sanitizer >/dev/null 2>&1; then
    run_step sanitizer 40 env NONLOCAL_KERNELS_TRITON_AUTOTUNE=0 \
        compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" scripts/gpu_sanitize_case.py
    run_step cuda-sanitizer 90 env CUDA_CHECK_TESTS=0 bash scripts/gpu_check_cuda.sh "$OUT/cuda" "$PY"
else
    echo "== sanitizer: compute-sanitizer not found, skipped" | tee -a "$SUMMARY"
fi

# 5. benchmarks on the GPU shapes (autotuned Triton kernels) ----------------------------------
run_step bench 150 "$PY" -m benchmarks --preset gpu --device cuda --repeats 5 --budget 3 \
    --out "$OUT/bench"

# 6. Triton head-dim caps sweep (cost of splitting dk/dv across programs) --------------------
run_step triton-sweep 60 "$PY" scripts/triton_sweep.py --budget 45 --out "$OUT/triton_sweep.md"

echo "== done in $(($(date +%s) - START))s, $FAILED step(s) not ok; logs in $OUT" | tee -a "$SUMMARY"
# Everything above in one file (a device tool may bring back only a few files).
tar czf "/tmp/gpu_check_bundle.$$.tgz" -C "$OUT" . && mv "/tmp/gpu_check_bundle.$$.tgz" "$OUT/bundle.tgz"
[ "$FAILED" -eq 0 ]
