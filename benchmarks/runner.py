"""Measure a benchmark case: peak memory per (shape, method, step), then the times of all
methods of the case side by side.

Peak memory: CPU cases run in a fresh process each (``python -m benchmarks.runner SPEC_JSON``),
so the peak RSS belongs to that case alone; the process gets an address-space limit so that a
case too big for the machine fails with an allocation error (reported as OOM) instead of taking
the machine down. CUDA cases run in-process and read torch.cuda.max_memory_allocated. Peak memory
is reported as the growth over what the inputs already hold, i.e. the extra memory the method
needs (for forward+backward that includes the input gradients).

Time (:func:`time_interleaved`): every method that ran within memory is timed in one process on
the same inputs, in rounds of one call per method (the order rotated every round), after warm-up
rounds; the result is each method's median over the rounds. A shared machine drifts in speed by
tens of percent within a minute, which a method-after-method protocol charges to whichever
method ran in the slow moment; in rounds every method sees the same drift.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from nonlocal_kernels import modes

from .cases import Case

RESULT_TAG = "BENCH-RESULT "


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) \
        or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def _timed_call(fn, device: torch.device) -> float:
    """Milliseconds of one fn() call (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _problem(spec: dict):
    """The problem a spec describes: a Non-local block ("block": a name in
    benchmarks.blocks.CASES) or the attention alone ("case": B, N, M, dk, dv)."""
    if "block" in spec:
        from .blocks import BlockProblem
        return BlockProblem(spec)
    return _Problem(spec)


class _Problem:
    """The inputs of one case (fresh random data) and its steps for a given method."""

    def method(self, name: str):
        from .baselines import get_method
        return get_method(name)

    def __init__(self, spec: dict):
        self.case = Case(*spec["case"])
        self.device = torch.device(spec["device"])
        self.dtype = getattr(torch, spec["dtype"])
        self.mode = spec["mode"]
        self.scale = modes.get(self.mode).default_scale(self.case.dk)

    def _make(self, B: int, N: int, M: int) -> tuple:
        from nonlocal_kernels.testing import make_inputs

        return make_inputs(B, N, M, self.case.dk, self.case.dv, dtype=self.dtype,
                           device=self.device,
                           with_concat=modes.get(self.mode).takes_concat_weight)

    def prime(self, fn) -> None:
        """One call on a tiny problem (thread pools, the autograd engine, lazy library loads),
        so that their one-off memory is not charged to the case."""
        small = [t.detach().requires_grad_() for t in self._make(1, 16, 16)]
        fn(*small[:3], small[3] if len(small) > 3 else None, self.mode, self.scale).sum().backward()

    def allocate(self) -> None:
        c = self.case
        theta, phi, g, *w = self._make(c.B, c.N, c.M)
        self.inputs = (theta, phi, g)
        self.leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
        self.w = w[0].detach().requires_grad_() if w else None
        self.dy = torch.randn(c.B, c.N, c.dv, dtype=self.dtype, device=self.device)

    def step(self, fn, step: str):
        if step == "fwd":
            def fwd():
                with torch.no_grad():
                    return fn(*self.inputs, self.w, self.mode, self.scale)
            return fwd

        def fwd_bwd():
            for t in self.leaves + ([self.w] if self.w is not None else []):
                t.grad = None
            fn(*self.leaves, self.w, self.mode, self.scale).backward(self.dy)
        return fwd_bwd


def _error_status(exc: BaseException, device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if _is_oom(exc):
        return "OOM"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def measure(spec: dict) -> dict:
    """Peak memory of one method. spec: case (B,N,M,dk,dv), method, mode, dtype, device and
    steps (a list of "fwd" and/or "fwd_bwd"; CPU runs one step per process so each peak is its
    own). Each step runs once (CUDA: twice, the first a warm-up); times are taken apart, by
    time_interleaved."""
    problem = _problem(spec)
    device = problem.device
    result = {"status": "ok"}
    try:
        fn = problem.method(spec["method"])
        problem.prime(fn)
        problem.allocate()

        def peak_of(run):
            if device.type == "cuda":
                # Warm-up first: JIT compilation and autotuning (Triton's benchmarking allocates
                # its own cache-flush buffer) must not count as the method's memory.
                run()
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                run()
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_allocated(device) - base
            base = _current_rss()
            run()
            return max(_peak_rss() - base, 0)

        from nonlocal_kernels.backends import registry
        for step in spec["steps"]:
            # The backends' debug hook says which exact path ran (e.g. fast's dot_product
            # "reordered" or "naive" by its cost model, whether cpu kept the scores); kept in the
            # row as "path".
            with registry.record_paths() as taken:
                result[f"peak_{step}_bytes"] = peak_of(problem.step(fn, step))
            if taken:
                result["path"] = taken[-1][1]
    except Exception as exc:  # reported in the table, never dropped
        result["status"] = _error_status(exc, device)
    return result


def time_interleaved(spec: dict) -> dict:
    """Median milliseconds of each method's steps, timed side by side on the same inputs.

    spec: case, mode, dtype, device, methods, steps ({"fwd" or "fwd_bwd": [methods to time]}),
    repeats (timed rounds), warmup (untimed rounds), settle (untimed calls of a method right
    before each of its timed calls, default 0) and budget_s (seconds of timed rounds per method
    and step; at least one round runs). A round calls every method of the step once (after its
    settle calls), in an order rotated by one each round. Returns {method: {"<step>_ms": float,
    "<step>_rounds": int, "<step>_round_ms": every call's milliseconds in call order, warm-up
    rounds first, "status": "<step> timing: ..." when it failed}}; a method that fails is not
    called again.

    settle matters on CPU: without it a call that follows another method's call finds the
    allocator holding that method's buffers (glibc returns large freed blocks to the OS), so
    its own come back fresh, at a page fault and a page clear per 4 KiB. At (2, 784, 196, 256,
    1024) the second call of every round took 1.0 ms (cpu) and 1.9 ms (naive) longer than
    the first, out of 3-4 ms, and with half the rounds in each mode the medians moved by up to
    15% between runs (benchmarks/results/cpu-mkl-pack-2026-12-01.md, section 3). One settle
    call does not always suffice; the CLI's CPU timing processes also keep glibc's heap
    (KEEP_HEAP_ENV).

    The warm-up matters on CPU: in a fresh process the first 3-4 calls of every method (naive,
    sdpa and ours alike) are 15-50% slower than the later ones
    (benchmarks/results/cpu-kernel-2026-11-24.md, section 7)."""
    problem = _problem(spec)
    device = problem.device
    out = {m: {} for m in spec["methods"]}
    fns = {}
    for m in spec["methods"]:
        try:
            fns[m] = problem.method(m)
            problem.prime(fns[m])
        except Exception as exc:
            fns.pop(m, None)
            out[m]["status"] = "timing: " + _error_status(exc, device)
    if fns:
        problem.allocate()
    warmup = spec.get("warmup", 3)
    settle = spec.get("settle", 0)
    for step, names in spec["steps"].items():
        runs = {m: problem.step(fns[m], step) for m in names
                if m in fns and "status" not in out[m]}
        times = {m: [] for m in runs}
        every = {m: [] for m in runs}
        budget_s = spec["budget_s"] * max(1, len(runs))
        start = None
        for r in range(warmup + max(1, spec["repeats"])):
            if not runs:
                break
            if r == warmup:
                start = time.perf_counter()
            order = list(runs)
            k = r % len(order)
            for m in order[k:] + order[:k]:
                try:
                    for _ in range(settle):
                        runs[m]()
                    t = _timed_call(runs[m], device)
                except Exception as exc:
                    out[m]["status"] = f"{step} timing: " + _error_status(exc, device)
                    del runs[m]
                    continue
                every[m].append(round(t, 4))
                if start is not None:
                    times[m].append(t)
            if start is not None and time.perf_counter() - start > budget_s:
                break
        for m, ts in times.items():
            if ts and "status" not in out[m]:
                out[m][f"{step}_ms"] = statistics.median(ts)
                out[m][f"{step}_rounds"] = len(ts)
                out[m][f"{step}_round_ms"] = every[m]
    return out


# glibc's settings for CPU timing processes with the heap kept (--cpu-heap keep): blocks up to
# 32 MiB (glibc's largest settable mmap threshold) come from the heap, and the heap is never
# handed back to the OS. After the warm-up rounds no timed call then pays page faults for
# memory that another method freed: with glibc's defaults (a threshold that follows the largest
# block freed, a trim past twice that) whether a call gets fresh pages depends on the calls
# before it, and at (2, 784, 196, 64, 2048) 2-8 of 35 settled forward+backward calls took
# 3104-3136 page faults (3-4 ms of 15) in an order that differs between methods
# (benchmarks/results/cpu-steady-heap-2026-12-01.md). Blocks above 32 MiB are mapped afresh at
# every call, by every method alike.
KEEP_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def measure_in_subprocess(spec: dict, timeout_s: float, mem_limit_gb: float,
                          env_extra: dict = None) -> dict:
    """measure(spec), or time_interleaved(spec) when spec names "methods", in a fresh process
    (with env_extra added to its environment)."""
    env = dict(os.environ, NONLOCAL_KERNELS_BENCH_MEM_LIMIT_GB=str(mem_limit_gb),
               **(env_extra or {}))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.runner", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout_s:.0f} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode < 0:
        sig = -proc.returncode
        return {"status": "OOM (killed)" if sig == 9 else f"crashed (signal {sig})"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"error: exit {proc.returncode}: {tail[0][:160]}"}


def _main(argv: list) -> None:
    spec = json.loads(argv[0])
    limit = float(os.environ.get("NONLOCAL_KERNELS_BENCH_MEM_LIMIT_GB", "0"))
    if limit > 0:
        nbytes = int(limit * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = time_interleaved(spec) if "methods" in spec else measure(spec)
    if "methods" in spec:  # the allocator settings the times were taken with
        result["malloc_env"] = {k: os.environ[k] for k in sorted(os.environ)
                                if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    print(RESULT_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
