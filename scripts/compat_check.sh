#!/usr/bin/env bash
# The package against another torch release, on this machine (no GPU; not part of CI: it
# downloads that torch, a CUDA build of several GB with its nvidia-* packages):
#
#     scripts/compat_check.sh TORCH_VERSION [REPORT]
#
# e.g. `scripts/compat_check.sh 2.11.0` (the GPU image's torch) or the newest release. It
#   1. makes a venv with the Python that runs it (PYTHON, default python3) and keeps that venv's
#      own pip and setuptools (Python 3.11's venv brings setuptools 65.5: an old setuptools, as
#      the GPU image may have), then installs torch==TORCH_VERSION with the Triton it requires,
#      plus numpy, pytest, ninja and wheel (setuptools < 70.1 builds wheels through `wheel`).
#      This machine's pip caps torch through /etc/xdg/pip; PIP_CONFIG_FILE=/dev/null lifts that
#      for this venv's pip only (pip then reads no configuration file);
#   2. copies the checkout (git ls-files, so no build output comes along) and in the copy builds
#      the package as the GPU check does, offline: the editable install
#      `pip install --no-build-isolation --no-deps --no-index -e .` and a wheel
#      `pip wheel --no-build-isolation --no-deps --no-index .`, the C++ extension only
#      (NONLOCAL_KERNELS_CUDA=0; COMPAT_CUDA=1 builds the CUDA kernels too, for TORCH_CUDA_ARCH_LIST);
#   3. imports the package and lists its backends;
#   4. runs the tests that depend most on torch's and Triton's versions: the Triton interpreter
#      tests (tests/test_triton.py and the conformance suite's triton cases), the sdpa backend's
#      tests (it calls ATen's SDPA ops by name) and tests/test_ops.py. Where Triton's
#      interpreter cannot run with the NumPy installed (Triton < 3.8, NumPy >= 2.4), the venv
#      takes numpy<2.4 first, and the report says so;
#   5. compiles every Triton kernel configuration for sm_90 (scripts/triton_compile_check.py).
#
# Writes the report to REPORT (default benchmarks/results/compat-torch-TORCH_VERSION.md) and
# prints it. Every step runs whatever the last one did; the exit status is 1 if any failed.
# Environment: PYTHON; COMPAT_DIR (default /tmp/nonlocal-compat: venvs and copies, torch-V
# inside); COMPAT_KEEP=1 keeps the venv afterwards (reused by the next run of the same version);
# COMPAT_TESTS (a pytest -k expression to narrow step 4).
set -uo pipefail
V=${1:?usage: scripts/compat_check.sh TORCH_VERSION [REPORT]}
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
REPORT=${2:-$ROOT/benchmarks/results/compat-torch-$V.md}
PYTHON=${PYTHON:-python3}
DIR=${COMPAT_DIR:-/tmp/nonlocal-compat}/torch-$V
VENV=$DIR/venv
SRC=$DIR/src
PY=$VENV/bin/python
LOG=$DIR/log.txt
FAILED=0
START=$(date +%s)
mkdir -p "$DIR" && : >"$LOG"

say() { echo "$*" | tee -a "$REPORT.tmp"; }
# step NAME COMMAND...: runs it in $SRC, output to the log; a status line and the output's
# last lines (or the lines matching STEP_GREP) go to the report.
step() {
    local name=$1
    shift
    local t0 rc out
    t0=$(date +%s)
    out=$( (cd "$SRC" 2>/dev/null || cd "$ROOT"; "$@") 2>&1)
    rc=$?
    { echo "===== $name: $*"; echo "$out"; } >>"$LOG"
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    say ""
    say "### $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") ($(($(date +%s) - t0)) s)"
    say ""
    say '```'
    say "\$ $*"
    if [ -n "${STEP_GREP:-}" ]; then
        echo "$out" | grep -E "$STEP_GREP" | tail -n "${STEP_LINES:-15}" | tee -a "$REPORT.tmp"
    else
        echo "$out" | tail -n "${STEP_LINES:-15}" | tee -a "$REPORT.tmp"
    fi
    say '```'
}

: >"$REPORT.tmp"
say "# torch $V: build, import, interpreter tests and Triton compile check"
say ""
say "\`scripts/compat_check.sh $V\` on $(date -u '+%Y-%m-%d %H:%M UTC'), checkout $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')."
say "Machine: $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), no GPU."

# 1. venv ------------------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$V')" 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || exit 2
fi
STEP_LINES=4 step install env PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q \
    --disable-pip-version-check "torch==$V" numpy pytest ninja wheel
STEP_LINES=20 step versions "$PY" -c '
import platform, setuptools, torch
print("python", platform.python_version(), "| setuptools", setuptools.__version__)
print("torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
'

# 2. the build, from a copy of the checkout, offline ------------------------------------------
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC")
export NONLOCAL_KERNELS_CUDA=${COMPAT_CUDA:-0} NONLOCAL_KERNELS_EMU=0 MAX_JOBS=${MAX_JOBS:-2}
STEP_LINES=6 step build-editable "$PY" -m pip install --disable-pip-version-check \
    --no-build-isolation --no-deps --no-index -e .
STEP_LINES=6 step build-wheel "$PY" -m pip wheel --disable-pip-version-check \
    --no-build-isolation --no-deps --no-index -w "$DIR/wheel" .

# 3. import ------------------------------------------------------------------------------------
STEP_LINES=20 step import "$PY" -c '
import json, nonlocal_kernels as nk
for b in nk.available_backends():
    print(json.dumps({k: b[k] for k in ("name", "available", "reason")}))
'

# The Triton interpreter of Triton < 3.8 cannot run with NumPy >= 2.4 (the backend then says
# so and its tests skip); for the interpreter tests to run, this venv then takes numpy<2.4.
STEP_LINES=6 step interpreter env TRITON_INTERPRET=1 "$PY" -c '
import subprocess, sys
from nonlocal_kernels.backends import triton as t
reason = t._interpreter_unusable()
print("Triton interpreter:", reason or "usable")
if reason:
    print("installing numpy<2.4 in this venv for the interpreter tests")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "numpy<2.4"], check=True)
    print(subprocess.run([sys.executable, "-c", "import numpy; print(\"numpy\", numpy.__version__)"],
                         capture_output=True, text=True).stdout.strip())
'

# 4. tests (TRITON_INTERPRET is set by tests/conftest.py without a GPU) -------------------------
K=${COMPAT_TESTS:-triton or sdpa or test_ops}
STEP_GREP='passed|failed|error|FAILED|ERROR|skipped' STEP_LINES=25 step tests \
    env NONLOCAL_KERNELS_POISON=1 "$PY" -m pytest -q -p no:cacheprovider -rfE \
    tests/test_triton.py tests/test_sdpa.py tests/test_ops.py tests/test_conformance.py -k "$K"

# 5. Triton compile check for sm_90 --------------------------------------------------------------
STEP_LINES=200 step triton-compile-sm90 "$PY" scripts/triton_compile_check.py --arch 90 \
    --all-configs

say ""
say "$FAILED step(s) failed; $(($(date +%s) - START)) s in all. Full log: $LOG"
mv "$REPORT.tmp" "$REPORT"
[ "${COMPAT_KEEP:-0}" = 1 ] || rm -rf "$VENV" "$SRC" "$DIR/wheel"
[ $FAILED -eq 0 ]
