"""Backend `fast`'s concatenation mode against the naive path (`reference`), forward+backward,
warm, at one shape (default I3D res3: B=1, N=3136, M=784, dk=dv=256, float32, channels-first
inputs as nonlocal_kernels.testing.make_inputs makes them).

    python -m benchmarks.concat_speed [--rounds 21] [--threads 1 2] [--profile]

Rounds of `fast` and `reference` alternate (so a change in the machine's load hits both); each
figure is the median over the rounds after warm-up. One thread: CPU time of the process
(time.process_time, which a descheduled thread does not inflate); more threads: wall time.
--profile prints torch.profiler's table of one fast round per thread count.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=5, default=[1, 3136, 784, 256, 256])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", action="store_true")
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
