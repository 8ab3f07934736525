"""Cost of splitting head dims in the Triton kernels (GPU only; scripts/gpu_check.sh runs it).

For each shape and each setting of the head-dim caps (NONLOCAL_KERNELS_TRITON_CAPS, see
nonlocal_kernels/backends/triton/launch.py) it times forward and forward+backward with the
default tile configuration (no autotuning, so every setting compiles the same number of kernels
and the comparison isolates the caps) and prints a markdown table (also written to --out).

A cap below the head dim means more programs, each recomputing S = theta phi^T for its part;
a larger cap holds bigger tiles in registers (fewer programs, more register pressure).

    python scripts/triton_sweep.py [--out FILE] [--dtype bfloat16]
"""

import argparse
import os
import sys
import time

import torch

# Run from a checkout: import this checkout's package (scripts/.. on the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SETTINGS = [
    "fwd=128x256,kv=256x256,q=256x256",   # the defaults (16-bit)
    "fwd=128x256,kv=128x128,q=128x128",   # split the backward more
    "fwd=64x64,kv=64x64,q=64x64",         # split everything
    "fwd=256x512,kv=256x512,q=512x256",   # hold more
]
SHAPES = [(8, 3136, 784, 256, 256), (8, 784, 196, 512, 512), (8, 784, 196, 1024, 512),
          (1, 8192, 2048, 1024, 512)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=100.0, help="stop after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to sweep")
        return 0
    os.environ["NONLOCAL_KERNELS_TRITON_AUTOTUNE"] = "0"
    import triton.testing

    import nonlocal_kernels as nk
    from nonlocal_kernels.backends.triton import launch as L

    dtype = getattr(torch, args.dtype)
    lines = [f"# Triton head-dim caps sweep ({args.dtype}, default tiles, no autotuning)", "",
             f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", "",
             "| shape (B, N, M, dk, dv) | caps (k x v per kernel) | fwd parts | kv parts | "
             "q parts | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|---|"]
    out = open(args.out, "w") if args.out else None

    def emit(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    for line in lines:
        emit(line)
    start = time.time()
    for B, N, M, dk, dv in SHAPES:
        theta, phi, g = (torch.randn(B, n, d, device="cuda", dtype=dtype).requires_grad_()
                         for n, d in ((N, dk), (M, dk), (M, dv)))
        dy = torch.randn(B, N, dv, device="cuda", dtype=dtype)
        for setting in SETTINGS:
            if time.time() - start > args.budget:
                emit(f"(stopped: budget of {args.budget:.0f} s spent)")
                return 0
            os.environ["NONLOCAL_KERNELS_TRITON_CAPS"] = setting
            parts = []
            for kern in ("fwd", "kv", "q"):
                bk, bv, nk_, nv = L.blocks(kern, dk, dv, dtype)
                parts.append({"fwd": nv, "kv": max(nk_, nv), "q": nk_}[kern])

            def fwd():
                with torch.no_grad():
                    nk.nonlocal_attention(theta, phi, g, backend="triton", scale=dk ** -0.5)

            def fwd_bwd():
                y = nk.nonlocal_attention(theta, phi, g, backend="triton", scale=dk ** -0.5)
                torch.autograd.grad(y, (theta, phi, g), dy)

            try:
                t_f = triton.testing.do_bench(fwd, warmup=5, rep=50, return_mode="median")
                t_fb = triton.testing.do_bench(fwd_bwd, warmup=5, rep=50, return_mode="median")
                times = f"{t_f:.2f} | {t_fb:.2f}"
            except Exception as exc:  # report, keep going
                times = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} |"
            emit(f"| {(B, N, M, dk, dv)} | {setting} | {parts[0]} | {parts[1]} | {parts[2]} | "
                 f"{times} |")
        del theta, phi, g, dy
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
