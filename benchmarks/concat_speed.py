"""Backend `fast`'s concatenation mode against the naive path (`reference`), forward+backward,
warm, at one shape (default I3D res3: B=1, N=3136, M=784, dk=dv=256, float32, channels-first
inputs as nonlocal_kernels.testing.make_inputs makes them).

    python -m benchmarks.concat_speed [--rounds 21] [--threads 1 2] [--profile]

Rounds of `fast` and `reference` alternate (so a change in the machine's load hits both); each
figure is the median over the rounds after warm-up. One thread: CPU time of the process
(time.process_time, which a descheduled thread does not inflate); more threads: wall time.
--profile prints torch.profiler's table of one fast round per thread count.
--ops times the C++ ops alone (concat_sorted_fwd, concat_sorted_bwd, concat_project on theta;
min / median of 60 calls, no reference rounds in between) at each thread count, for the build
NONLOCAL_KERNELS_CPU_ISA selects.
"""
import argparse
import statistics
import time

import torch

import nonlocal_kernels as nk
from nonlocal_kernels.testing import make_inputs


def one_round(backend, t, p, g, w, dy):
    for x in (t, p, g, w):
        x.grad = None
    y = nk.nonlocal_attention(t, p, g, mode="concatenation", concat_weight=w, backend=backend)
    y.backward(dy)


def time_ops(t, p, g, w, rounds=60):
    """min / median ms of each C++ op of the fast concatenation path, called directly."""
    ops = torch.ops.nonlocal_kernels
    dk = t.shape[2]
    with torch.no_grad():
        y, a, nbs, perm, k, P = torch.ops.nonlocal_kernels_fast.concat_fwd(t, p, g, w)
        dy = torch.randn_like(y)
        w_theta = w[:dk].contiguous()
        calls = {"concat_sorted_fwd": lambda: ops.concat_sorted_fwd(a, nbs, perm, g),
                 "concat_sorted_bwd": lambda: ops.concat_sorted_bwd(dy, a, k, P, nbs, perm, g, t,
                                                                    p, w),
                 "concat_project(theta)": lambda: ops.concat_project(t, w_theta)}
        out = {}
        for name, f in calls.items():
            for _ in range(5):
                f()
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            out[name] = (min(ts) * 1e3, statistics.median(ts) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=5, default=[1, 3136, 784, 256, 256])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", action="store_true")
    args = ap.parse_args()
    B, N, M, dk, dv = args.shape
    torch.manual_seed(0)
    t, p, g, w = make_inputs(B, N, M, dk, dv, with_concat=True)
    for x in (t, p, g, w):
        x.requires_grad_(True)
    dy = torch.randn(B, N, dv)
    print(f"nonlocal_kernels from {nk.__file__}; torch {torch.__version__}; shape {args.shape}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        if args.ops:
            res = time_ops(*(x.detach() for x in (t, p, g, w)))
            print(f"threads={threads} ops alone (min / median ms of 60): " + ", ".join(
                f"{n} {lo:.3f} / {med:.3f}" for n, (lo, med) in res.items()))
            continue
        clock = time.process_time if threads == 1 else time.perf_counter
        times = {"fast": [], "reference": []}
        for _ in range(args.warmup):
            for b in times:
                one_round(b, t, p, g, w, dy)
        for _ in range(args.rounds):
            for b in times:
                t0 = clock()
                one_round(b, t, p, g, w, dy)
                times[b].append(clock() - t0)
        med = {b: statistics.median(v) * 1e3 for b, v in times.items()}
        lo = {b: min(v) * 1e3 for b, v in times.items()}
        print(f"threads={threads} ({'CPU' if threads == 1 else 'wall'} time, median of "
              f"{args.rounds}): fast {med['fast']:.2f} ms (min {lo['fast']:.2f}), reference "
              f"{med['reference']:.2f} ms (min {lo['reference']:.2f}), speed-up "
              f"{med['reference'] / med['fast']:.2f}x")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    one_round("fast", t, p, g, w, dy)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
