#!/usr/bin/env bash
# Everything a GPU machine should run, in one command (docs/design.md section 6):
#
#     scripts/gpu_check.sh OUT_DIR
#
# Made for a lease of 15 minutes of device time, machine start (1-2 min) included, on an image
# with its own torch (2.11) and Triton (3.6) and no network. The whole run has a budget
# (GPU_CHECK_TOTAL, default 480 s); each step has its own limit, cut to what is left of the
# budget, and a step that no longer fits is skipped and says so. The most valuable evidence
# comes first:
#   1. env       the GPU, driver, versions, git commit;
#   2. build     the package in place, for this GPU's architecture only
#                (pip install --no-build-isolation --no-deps --no-index -e .; if pip cannot,
#                e.g. an old setuptools without `wheel`, `setup.py build_ext --inplace`);
#   3. import    the backends and whether each is available;
#   4. tests     the whole suite, `gpu` tests included (every backend, every dtype, the
#                conformance suite), one pytest process per test file, several at once
#                (scripts/gpu_tests.sh: a crash costs only its file and gets a backtrace);
#                Triton autotuning off (test_every_gpu_config checks each candidate);
#   5. bench     every available GPU backend against torch's SDPA (default dispatch, and each
#                fused kernel forced) and the naive path at the design's GPU shapes, bfloat16,
#                forward and forward+backward: time, TFLOP/s, peak memory
#                (python -m benchmarks --preset gpu);
#   6. sanitizer compute-sanitizer memcheck on one small case per GPU backend, then racecheck,
#                synccheck and memcheck on the cuda backend's cases (scripts/gpu_check_cuda.sh).
#                A probe first: where compute-sanitizer refuses the device ("Device not
#                supported") or is missing, the step says so and moves on in seconds;
#   7. triton-triage  scripts/triton_triage.py, only when tests/test_triton.py failed;
#   8. triton-sweep   the Triton head-dim caps sweep, only with time left.
# Without a GPU (a dry run, e.g. on a development machine) step 1 runs and every other step is
# reported as skipped for lack of a GPU; it takes seconds.
#
# OUT_DIR receives at most 8 files (a device tool brings back only that many):
#   summary.md      one table: each step, its status, its time and its last line, then each
#                   test file's result
#   log.txt         every step's output, concatenated
#   bench.md, bench.json   the benchmark table and its numbers
#   triton_triage.md       when the triage ran
#   bundle.tgz      everything (per-file test logs and junit XML, sanitizer logs, plots)
# Environment: PYTHON (default python3); GPU_CHECK_TOTAL; GPU_CHECK_SKIP (space-separated step
# names); GPU_CHECK_TIMEOUT_<STEP>=seconds (e.g. GPU_CHECK_TIMEOUT_BENCH=120); GPU_TESTS_JOBS;
# NONLOCAL_KERNELS_EMU (default 0: the emulated CUDA extension is for CPU-only CI).
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
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SUMMARY="$OUT/summary.md"
LOG="$OUT/log.txt"
START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL:-480}
FAILED=0
STEP_NO=0
rm -f "$SUMMARY" "$LOG" "$OUT/bench.md" "$OUT/bench.json" "$OUT/triton_triage.md" \
    "$OUT/bundle.tgz"

export NONLOCAL_KERNELS_EMU=${NONLOCAL_KERNELS_EMU:-0}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
# nvcc, compute-sanitizer and cuobjdump live here on a stock CUDA install.
export PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"

GPU=$("$PY" -c 'import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")' 2>/dev/null)
{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$ROOT at $(git rev-parse --short HEAD 2>/dev/null) ($(git status --short 2>/dev/null | wc -l) changed files); GPU: ${GPU:-none}; budget ${TOTAL} s."
    echo
    echo "| # | step | status | s | last line |"
    echo "|---|---|---|---|---|"
} >"$SUMMARY"

row() {  # row NAME STATUS SECONDS LAST_LINE
    local last=${4//|/\\|}
    printf '| %s | %s | %s | %s | %s |\n' "$STEP_NO" "$1" "$2" "$3" "${last:0:160}" >>"$SUMMARY"
    printf '%-15s %-40s %4ss  %s\n' "$1" "$2" "$3" "${4:0:100}"
}

# run_step NAME LIMIT NEEDS_GPU COMMAND...: output to WORK/NN-NAME.log and log.txt; a row in
# summary.md. Returns the command's exit status (0 when skipped).
run_step() {
    local name=$1 limit=$2 needs_gpu=$3
    shift 3
    local var="GPU_CHECK_TIMEOUT_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
    limit=${!var:-$limit}
    local left=$((TOTAL - ($(date +%s) - START)))
    STEP_NO=$((STEP_NO + 1))
    case " ${GPU_CHECK_SKIP:-} " in
        *" $name "*) row "$name" "skipped (GPU_CHECK_SKIP)" 0 ""; return 0 ;;
    esac
    if [ "$needs_gpu" = gpu ] && [ -z "$GPU" ]; then
        row "$name" "skipped: no GPU" 0 ""
        return 0
    fi
    if [ "$left" -lt 15 ]; then
        row "$name" "SKIPPED: ${left} s of the budget left" 0 ""
        FAILED=$((FAILED + 1))
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log t0 rc status
    log="$WORK/$(printf '%02d' "$STEP_NO")-$name.log"
    t0=$(date +%s)
    echo "\$ $*" >"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    { echo "===== $STEP_NO $name: $status ($(($(date +%s) - t0)) s)"; cat "$log"; echo; } >>"$LOG"
    row "$name" "$status" "$(($(date +%s) - t0))" "$(grep -v '^\s*$' "$log" | tail -n 1)"
    return $rc
}

# 1. environment ---------------------------------------------------------------------------
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
    import setuptools
    print("setuptools", setuptools.__version__)
except Exception as exc:
    print("setuptools: not importable:", exc)
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
run_step env 30 any bash -c env_info

# 2. build, for this GPU's architecture only ---------------------------------------------------
if [ -n "$GPU" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")')
    export TORCH_CUDA_ARCH_LIST
fi
run_step build 150 gpu bash -c '"$0" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
    { echo "pip failed; building in place instead"; "$0" setup.py build_ext --inplace; }' "$PY"
run_step import 30 gpu "$PY" -c 'import nonlocal_kernels as nk, json
print(nk.__file__)
for b in nk.available_backends():
    print(json.dumps({k: b[k] for k in ("name", "available", "reason", "devices", "priority")}))'

# 3. the whole test suite, one process per file ------------------------------------------------
run_step tests 200 gpu env NONLOCAL_KERNELS_TRITON_AUTOTUNE=0 NONLOCAL_KERNELS_POISON=1 \
    bash scripts/gpu_tests.sh "$WORK/tests" "$PY"
TRITON_TESTS_FAILED=0
if [ -d "$WORK/tests" ]; then
    { echo; echo "| test file | result |"; echo "|---|---|"; } >>"$WORK/tests.md"
    for s in "$WORK"/tests/*.status; do
        [ -f "$s" ] || continue
        line=$(head -n 1 "$s")
        echo "| ${line%%:*} | ${line#*: } |" >>"$WORK/tests.md"
    done
    grep -q '^test_triton: rc=0 ' "$WORK/tests/test_triton.status" 2>/dev/null ||
        TRITON_TESTS_FAILED=1
fi

# 4. the benchmark table ---------------------------------------------------------------------
# The package's GPU backends, the naive path, SDPA's default dispatch and each of its fused
# kernels forced (its math kernel is what the default falls back to, so not forced again).
METHODS=$("$PY" -c 'import nonlocal_kernels as nk
names = [b["name"] for b in nk.available_backends() if b["available"] and "cuda" in b["devices"]
         and b["name"] not in ("reference", "fast")]
print(",".join(names + ["naive", "torch_sdpa", "torch_sdpa_flash", "torch_sdpa_efficient",
                        "torch_sdpa_cudnn"]))' 2>/dev/null)
run_step bench 120 gpu "$PY" -m benchmarks --preset gpu --device cuda --dtype bfloat16 \
    --backends "$METHODS" --repeats 5 --warmup 2 --budget 1 --out "$WORK/bench"
cp "$WORK/bench/results.md" "$OUT/bench.md" 2>/dev/null
cp "$WORK/bench/results.json" "$OUT/bench.json" 2>/dev/null

# 5. compute-sanitizer, where it runs on this device -------------------------------------------
SAN=$(command -v compute-sanitizer || true)
if [ -n "$GPU" ] && [ -n "$SAN" ]; then
    # A probe of a few seconds: some machines refuse the device ("Device not supported").
    timeout 30 "$SAN" --tool memcheck "$PY" -c \
        'import torch; torch.ones(8, device="cuda").sum().item()' >"$WORK/sanitizer-probe.log" 2>&1
    if grep -qi "not supported" "$WORK/sanitizer-probe.log" || [ -z "$(grep -i 'ERROR SUMMARY' "$WORK/sanitizer-probe.log")" ]; then
        SAN=""
        STEP_NO=$((STEP_NO + 1))
        row sanitizer "skipped: compute-sanitizer refused or failed on this device" 0 \
            "$(grep -v '^\s*$' "$WORK/sanitizer-probe.log" | tail -n 1)"
        { echo "===== sanitizer probe"; cat "$WORK/sanitizer-probe.log"; echo; } >>"$LOG"
    fi
elif [ -n "$GPU" ]; then
    STEP_NO=$((STEP_NO + 1))
    row sanitizer "skipped: compute-sanitizer not found" 0 ""
fi
if [ -z "$GPU" ] || [ -n "$SAN" ]; then
    run_step sanitizer 40 gpu env NONLOCAL_KERNELS_TRITON_AUTOTUNE=0 \
        "$SAN" --tool memcheck --error-exitcode 3 "$PY" scripts/gpu_sanitize_case.py
    run_step cuda-sanitizer 60 gpu env CUDA_CHECK_TESTS=0 \
        bash scripts/gpu_check_cuda.sh "$WORK/cuda" "$PY"
fi

# 6. Triton triage when its tests failed; the caps sweep with what time is left ----------------
if [ -z "$GPU" ] || [ "$TRITON_TESTS_FAILED" = 1 ]; then
    run_step triton-triage 90 gpu "$PY" scripts/triton_triage.py --out "$OUT/triton_triage.md"
else
    STEP_NO=$((STEP_NO + 1))
    row triton-triage "skipped: tests/test_triton.py passed" 0 ""
fi
run_step triton-sweep 45 gpu "$PY" scripts/triton_sweep.py --budget 35 \
    --out "$WORK/triton_sweep.md"

# summary, bundle ----------------------------------------------------------------------------
[ -f "$WORK/tests.md" ] && cat "$WORK/tests.md" >>"$SUMMARY"
{
    echo
    echo "$FAILED step(s) not ok; $(($(date +%s) - START)) s in all."
} | tee -a "$SUMMARY"
cp "$SUMMARY" "$LOG" "$WORK/" 2>/dev/null
tar czf "$OUT/bundle.tgz" -C "$WORK" . 2>/dev/null
rm -rf "$WORK"
n=$(find "$OUT" -type f | wc -l)
echo "$OUT holds $n files (at most 8 come back from a device tool)"
[ "$n" -le 8 ] || echo "WARNING: more than 8 files in $OUT" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
