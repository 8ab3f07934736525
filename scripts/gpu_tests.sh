#!/usr/bin/env bash
# The test suite on a GPU machine, one pytest process per test file (scripts/gpu_check.sh):
#
#     scripts/gpu_tests.sh OUT_DIR [PYTHON] [TEST_FILE ...]
#
# A crash (segfault) or an illegal memory access ends a process and its CUDA context, and every
# later test in it would fail for that reason alone; here it costs only its own file. When a
# file's process dies on a signal, the test that was running (from Python's faulthandler
# output) is run again alone under a debugger (gdb, else cuda-gdb) for a native backtrace:
# OUT_DIR/crash-<file>.log. Every file gets OUT_DIR/<file>.log and OUT_DIR/junit-<file>.xml.
#
# GPU_TESTS_JOBS files run at once (default 4: the GPU and 16 cores take several processes,
# and the suite's files differ in length), the files that exercise the GPU backends started
# first, each with OMP_NUM_THREADS = cores / GPU_TESTS_JOBS unless set. Prints one line per file,
# in the order given; the exit status is non-zero if any file failed.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_tests.sh OUT_DIR [PYTHON] [TEST_FILE ...]}
PY=${2:-${PYTHON:-python3}}
shift $(($# >= 2 ? 2 : 1))
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    # The GPU backends' files first (conformance runs every backend), then the rest.
    files=(tests/test_conformance.py tests/test_triton.py tests/test_sdpa.py tests/test_cuda.py
           tests/test_fast_paths.py)
    for f in tests/test_*.py; do
        case " ${files[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac
    done
fi

run_file() {  # run_file FILE: one pytest process; on a crash, the backtrace of the crashing test
    local f=$1 name rc t0 test dbg
    name=$(basename "$f" .py)
    t0=$SECONDS
    "$PY" -X faulthandler -m pytest "$f" -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/junit-$name.xml" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc ($((SECONDS - t0)) s) $(tail -n 1 "$OUT/$name.log")" >"$OUT/$name.status"
    if [ $rc -gt 128 ]; then
        # "File ".../tests/test_x.py", line N in test_name" of the thread that crashed
        test=$(grep -A 40 '^Current thread' "$OUT/$name.log" |
               sed -n "s|.*$name.py\", line [0-9]* in \(test_[A-Za-z0-9_]*\).*|\1|p" | head -n 1)
        dbg=$(command -v gdb || command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)
        echo "  crashed in ${test:-?}; native backtrace: $OUT/crash-$name.log ($dbg)" \
            >>"$OUT/$name.status"
        if [ -n "$test" ] && [ -x "$dbg" ]; then
            timeout 120 "$dbg" -batch -ex run -ex bt -ex "info sharedlibrary" --args \
                "$PY" -m pytest "$f" -q -p no:cacheprovider -k "$test" \
                >"$OUT/crash-$name.log" 2>&1
        fi
    fi
    return 0
}
export -f run_file
export OUT PY
# The files share the cores: each process gets its part of them for torch's CPU threads.
JOBS=${GPU_TESTS_JOBS:-4}
CORES=$(nproc 2>/dev/null || echo 4)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CORES / JOBS > 0 ? CORES / JOBS : 1))}

printf '%s\0' "${files[@]}" | xargs -0 -n 1 -P "$JOBS" bash -c 'run_file "$0"'

status=0
for f in "${files[@]}"; do
    name=$(basename "$f" .py)
    if [ -f "$OUT/$name.status" ]; then
        cat "$OUT/$name.status"
        rc=$(sed -n '1s/.*: rc=\([0-9]*\).*/\1/p' "$OUT/$name.status")
        [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1  # 5: every test deselected or skipped
    else
        echo "$name: not run (the step's time ran out first)"
        status=1
    fi
done
exit $status
