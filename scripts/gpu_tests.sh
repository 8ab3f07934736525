#!/usr/bin/env bash
# The test suite on a GPU machine, one pytest process per test file (scripts/gpu_check.sh):
#
#     scripts/gpu_tests.sh OUT_DIR [PYTHON] [TEST_FILE ...]
#
# A crash (segfault) or an illegal memory access ends a process and its CUDA context, and every
# later test in it would fail for that reason alone; here it costs only its own file. When a
# file's process dies on a signal, the test that was running (from Python's faulthandler
# output) is run again alone under a debugger (gdb, else cuda-gdb) for a native backtrace:
# OUT_DIR/crash-<file>.log. Every file gets OUT_DIR/junit-<file>.xml; the exit status is
# non-zero if any file failed.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_tests.sh OUT_DIR [PYTHON] [TEST_FILE ...]}
PY=${2:-${PYTHON:-python3}}
shift $(($# >= 2 ? 2 : 1))
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT"
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(tests/test_*.py)

status=0
for f in "${files[@]}"; do
    name=$(basename "$f" .py)
    t0=$SECONDS
    "$PY" -X faulthandler -m pytest "$f" -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/junit-$name.xml" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc ($((SECONDS - t0)) s) $(tail -n 1 "$OUT/$name.log")"
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1  # 5: every test deselected or skipped
    if [ $rc -gt 128 ]; then
        # "File ".../tests/test_x.py", line N in test_name" of the thread that crashed
        test=$(grep -A 40 '^Current thread' "$OUT/$name.log" |
               sed -n "s|.*$name.py\", line [0-9]* in \(test_[A-Za-z0-9_]*\).*|\1|p" | head -n 1)
        dbg=$(command -v gdb || command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)
        echo "  crashed in ${test:-?}; native backtrace: $OUT/crash-$name.log ($dbg)"
        if [ -n "$test" ] && [ -x "$dbg" ]; then
            timeout 120 "$dbg" -batch -ex run -ex bt -ex "info sharedlibrary" --args \
                "$PY" -m pytest "$f" -q -p no:cacheprovider -k "$test" \
                >"$OUT/crash-$name.log" 2>&1
        fi
    fi
done
exit $status
