"""The CPU kernel's two ways of doing its tile products, side by side:

- ``vec`` (default): the Vectorized panel GEMM of csrc/cpu/softmax_kernel_impl.h, phi/g packed
  into panels once per call;
- ``blas``: a BLAS sgemm_/dgemm_ call (torch's MKL) per tile product.

    python -m benchmarks.cpu_gemm_paths [--preset cpu] [--rounds 6] [--shape B,N,M,dk,dv ...]

Times the ops themselves (torch.ops.nonlocal_kernels.softmax_fwd / softmax_bwd, no autograd), in
one process, the two paths interleaved round by round; reports the best round of each (the
machine may be shared: the minimum is the least disturbed measurement).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .cases import PRESETS, parse_shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_gemm_paths", description=__doc__)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--shape", action="append", default=[], help="B,N,M,dk,dv (replaces preset)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-gflop", type=float, default=20.0,
                   help="skip shapes whose forward exceeds this many GFLOP")
    args = p.parse_args(argv)

    import nonlocal_kernels  # noqa: F401  (loads the ops)
    from nonlocal_kernels.testing import make_inputs

    cases = [parse_shape(s) for s in args.shape] or PRESETS[args.preset]
    op = torch.ops.nonlocal_kernels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| shape (B, N, M, dk, dv) | path | fwd ms | bwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for case in cases:
        if case.fwd_flops() / 1e9 > args.max_gflop:
            continue
        theta, phi, g = make_inputs(case.B, case.N, case.M, case.dk, case.dv)
        dy = torch.randn(case.B, case.N, case.dv)
        scale = case.dk ** -0.5
        y, lse = op.softmax_fwd(theta, phi, g, scale)
        best = {}
        for r in range(args.rounds):
            for path in ("vec", "blas"):
                os.environ["NONLOCAL_KERNELS_CPU_GEMM"] = path
                for step, fn in (("fwd", lambda: op.softmax_fwd(theta, phi, g, scale)),
                                 ("bwd", lambda: op.softmax_bwd(dy, theta, phi, g, y, lse,
                                                                scale))):
                    if r == 0:
                        fn()  # warm-up
                    t0 = time.perf_counter()
                    fn()
                    ms = (time.perf_counter() - t0) * 1e3
                    best[path, step] = min(best.get((path, step), float("inf")), ms)
        os.environ.pop("NONLOCAL_KERNELS_CPU_GEMM", None)
        for path in ("vec", "blas"):
            f, b = best[path, "fwd"], best[path, "bwd"]
            print(f"| {case.shape} | {path} | {f:.1f} | {b:.1f} | {f + b:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
