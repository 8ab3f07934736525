"""Measure one (shape, method): forward and forward+backward median time and peak memory.

CPU cases run in a fresh process each (``python -m benchmarks.runner SPEC_JSON``), so the peak
RSS belongs to that case alone; the process gets an address-space limit so that a case too big
for the machine fails with an allocation error (reported as OOM) instead of taking the machine
down. CUDA cases run in-process and read torch.cuda.max_memory_allocated.

Peak memory is reported as the growth over what the inputs already hold, i.e. the extra memory
the method needs (for forward+backward that includes the input gradients).
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


def _timed(fn, device: torch.device, repeats: int, budget_s: float) -> float:
    """Median milliseconds of fn() over up to `repeats` runs within ~budget_s (at least one)."""
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def measure(spec: dict) -> dict:
    """spec: case (B,N,M,dk,dv), method, mode, dtype, device, repeats, budget_s and steps (a
    list of "fwd" and/or "fwd_bwd"; CPU runs one step per process so each peak is its own)."""
    from nonlocal_kernels.testing import make_inputs

    from .baselines import get_method

    case = Case(*spec["case"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    mode = spec["mode"]
    fn = get_method(spec["method"])
    scale = case.dk ** -0.5 if mode in ("embedded_gaussian", "gaussian") else None
    result = {"status": "ok"}
    try:
        # Prime once on a tiny problem (thread pools, the autograd engine, lazy library loads),
        # so their one-off memory is not charged to the case.
        small = make_inputs(1, 16, 16, case.dk, case.dv, dtype=dtype, device=device,
                            with_concat=mode == "concatenation")
        small = [t.detach().requires_grad_() for t in small]
        fn(*small[:3], small[3] if len(small) > 3 else None, mode, scale).sum().backward()
        del small
        theta, phi, g, *w = make_inputs(case.B, case.N, case.M, case.dk, case.dv, dtype=dtype,
                                        device=device, with_concat=mode == "concatenation")
        w = w[0] if w else None
        leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
        if w is not None:
            w = w.detach().requires_grad_()
        dy = torch.randn(case.B, case.N, case.dv, dtype=dtype, device=device)

        def fwd():
            with torch.no_grad():
                return fn(theta, phi, g, w, mode, scale)

        def fwd_bwd():
            for t in leaves + ([w] if w is not None else []):
                t.grad = None
            fn(*leaves, w, mode, scale).backward(dy)

        def peak_of(step):
            if device.type == "cuda":
                # Warm-up first: JIT compilation and autotuning (Triton's benchmarking allocates
                # its own cache-flush buffer) must not count as the method's memory.
                step()
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_allocated(device) - base
            base = _current_rss()
            step()  # also the warm-up
            return max(_peak_rss() - base, 0)

        from nonlocal_kernels.backends import fast
        for step in spec["steps"]:
            run = fwd if step == "fwd" else fwd_bwd
            # The fast backend's debug hook says which exact path ran (e.g. dot_product
            # "reordered" or "naive" by its cost model); kept in the row as "path".
            with fast.record_paths() as taken:
                result[f"peak_{step}_bytes"] = peak_of(run)
                result[f"{step}_ms"] = _timed(run, device, spec["repeats"], spec["budget_s"])
            if taken:
                result["path"] = taken[-1][1]
    except Exception as exc:  # reported in the table, never dropped
        if _is_oom(exc):
            result["status"] = "OOM"
        else:
            result["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def measure_in_subprocess(spec: dict, timeout_s: float, mem_limit_gb: float) -> dict:
    env = dict(os.environ, NONLOCAL_KERNELS_BENCH_MEM_LIMIT_GB=str(mem_limit_gb))
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
    print(RESULT_TAG + json.dumps(measure(spec)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
