#!/usr/bin/env bash
# GPU-machine section for the `cuda` backend, called by scripts/gpu_check.sh (or alone) after the
# package is built there. Usage: scripts/gpu_check_cuda.sh OUT_DIR [PYTHON]
# CUDA_CHECK_TESTS=0 skips step 1 (gpu_check.sh sets it: its own test step ran the whole suite).
#   1. tests/test_cuda.py (the `gpu` tests of the cuda backend)      -> OUT_DIR/cuda_tests.log
#   2. compute-sanitizer racecheck, synccheck, memcheck on the small
#      cases of scripts/cuda_sanitizer_cases.py, where installed      -> OUT_DIR/sanitizer_*.log
# The benchmarks (python -m benchmarks) include `cuda` by default on a GPU; gpu_check.sh runs them.
# Exit status: non-zero if any step failed (every step still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check_cuda.sh OUT_DIR [PYTHON]}
PY=${2:-${PYTHON:-python}}
mkdir -p "$OUT"
status=0

step() {  # name, log, command...
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "[gpu_check_cuda] $name: rc=$rc ($((SECONDS - t0)) s, log $log)"
  tail -n 3 "$log"
  [ $rc -eq 0 ] || status=1
}

if [ "${CUDA_CHECK_TESTS:-1}" != 0 ]; then
  step "cuda tests" "$OUT/cuda_tests.log" \
    "$PY" -m pytest tests/test_cuda.py -v -rs --durations=10
fi

SAN=$(command -v compute-sanitizer || true)
for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$cand" ] && SAN=$cand
done
if [ -z "$SAN" ]; then
  echo "[gpu_check_cuda] compute-sanitizer not found: sanitizer checks not run" | tee "$OUT/sanitizer_skipped.log"
else
  for tool in racecheck synccheck memcheck; do
    # No caching allocator under memcheck, so out-of-bounds accesses hit unallocated memory.
    step "compute-sanitizer $tool" "$OUT/sanitizer_$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=$([ $tool = memcheck ] && echo 1 || echo 0) \
      "$SAN" --tool "$tool" --error-exitcode 1 --kernel-name kns=softmax \
      "$PY" scripts/cuda_sanitizer_cases.py
  done
fi
exit $status
