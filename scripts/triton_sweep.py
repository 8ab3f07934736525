"""Cost of large head dims in the Triton kernels (GPU only; scripts/gpu_check.sh runs it).

For each shape and each setting of the head-dim caps (NONLOCAL_KERNELS_TRITON_CAPS) and the
backward strategy (NONLOCAL_KERNELS_TRITON_BWD; see nonlocal_kernels/backends/triton/launch.py
and docs/triton.md) it times forward and forward+backward with the default tile configuration
(no autotuning, so every setting compiles the same number of kernels and the comparison isolates
the setting) and prints a markdown table (also written to --out).

Forward: a dv cap below dv splits y across programs, each recomputing S = theta phi^T.
Backward: "accumulate" computes S, P, dP, dS once and read-modify-writes float32 workspaces per
chunk; "recompute" splits the output columns across programs, each recomputing S (and dP).

    python scripts/triton_sweep.py [--out FILE] [--dtype bfloat16]
"""

import argparse
import os
import sys
import time

import torch

# Run from a checkout: import this checkout's package (scripts/.. on the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (head-dim caps, backward strategy); the first is the default for 16-bit inputs.
SETTINGS = [
    ("fwd=128x256,kv=256x256,q=256x256", "accumulate"),
    ("fwd=128x256,kv=256x256,q=256x256", "recompute"),
    ("fwd=128x256,kv=128x128,q=128x128", "accumulate"),
    ("fwd=64x64,kv=64x64,q=64x64", "accumulate"),
    ("fwd=256x128,kv=128x128,q=128x128", "recompute"),
]
SHAPES = [(8, 784, 196, 1024, 512), (8, 784, 196, 512, 512), (8, 3136, 784, 256, 256)]


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
             "| shape (B, N, M, dk, dv) | caps (k x v per kernel) | backward | fwd dv parts | "
             "kv dk x dv chunks | q dk chunks | fwd ms | fwd+bwd ms |",
             "|---|---|---|---|---|---|---|---|"]
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
        for setting, strategy in SETTINGS:
            if time.time() - start > args.budget:
                emit(f"(stopped: budget of {args.budget:.0f} s spent)")
                return 0
            os.environ["NONLOCAL_KERNELS_TRITON_CAPS"] = setting
            os.environ["NONLOCAL_KERNELS_TRITON_BWD"] = strategy
            fwd_parts = L.blocks("fwd", dk, dv, dtype)[3]
            _, _, kv_k, kv_v = L.blocks("kv", dk, dv, dtype)
            q_k = L.blocks("q", dk, dv, dtype)[2]

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
            emit(f"| {(B, N, M, dk, dv)} | {setting} | {strategy} | {fwd_parts} | "
                 f"{kv_k} x {kv_v} | {q_k} | {times} |")
        del theta, phi, g, dy
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
