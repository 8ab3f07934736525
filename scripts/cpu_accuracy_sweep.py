"""Worst error/tolerance ratio (DESIGN.md section 5) of backend `cpu` over many fresh draws.

    PYTHONPATH=. python scripts/cpu_accuracy_sweep.py [--seeds 150] [--seed0 1000] [--gemm vec|blas]
        [--only NAME ...]

For every case it prints, per output, the worst ratio max|out - ref64| / tol over the seeds
(1.0 is the edge of the rule). Used to find the cause of rare failures of tests/test_cpu.py.
"""
import argparse
import os

import torch

from nonlocal_kernels.testing import compare_with_oracle, make_inputs

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CASES = {  # name: (B, N, M, dk, dv, dtype, layout)
    "dk3_dv1024": (2, 23, 29, 3, 1024, F32, "channels_first"),
    "dk1024_dv3": (2, 23, 29, 1024, 3, F32, "channels_first"),
    "dk2_dv2053": (2, 23, 29, 2, 2053, F32, "channels_first"),
    "dk2053_dv2": (2, 23, 29, 2053, 2, F32, "channels_first"),
    "dk3_dv1024_bf16": (2, 23, 29, 3, 1024, BF16, "channels_first"),
    "dk3_dv1024_f16": (2, 23, 29, 3, 1024, F16, "channels_first"),
    "dk1024_dv3_f16": (2, 23, 29, 1024, 3, F16, "channels_first"),
    "ragged_f32": (2, 45, 37, 19, 11, F32, "strided"),
    "ragged_f16": (2, 45, 37, 19, 11, F16, "contiguous"),
    "ragged_bf16": (2, 45, 37, 19, 11, BF16, "channels_first"),
    "mid_f32": (1, 301, 530, 64, 48, F32, "channels_first"),
    "mid_bf16": (1, 301, 530, 64, 48, BF16, "channels_first"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=150)
    ap.add_argument("--gemm", default="vec")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed0", type=int, default=1000, help="first seed")
    args = ap.parse_args()
    os.environ["NONLOCAL_KERNELS_CPU_GEMM"] = args.gemm
    torch.set_num_threads(args.threads)
    for name, (B, N, M, dk, dv, dtype, layout) in CASES.items():
        if args.only and name not in args.only:
            continue
        worst = {}
        for seed in range(args.seeds):
            torch.manual_seed(args.seed0 + seed)
            t, p, g = make_inputs(B, N, M, dk, dv, dtype=dtype, layout=layout)
            for c in compare_with_oracle(t, p, g, backend="cpu", scale=dk ** -0.5,
                                         return_lse=True):
                r = c.error / c.tol
                if r != r:
                    r = float("inf")
                if r > worst.get(c.name, (-1, 0))[0]:
                    worst[c.name] = (r, seed)
        print(f"{name:18s} " + "  ".join(f"{k} {v[0]:.2f}(s{v[1]})" for k, v in worst.items()),
              flush=True)


if __name__ == "__main__":
    main()
