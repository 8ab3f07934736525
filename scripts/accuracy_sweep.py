"""Worst error / tolerance ratio (docs/design.md section 5) of a backend over many fresh draws.

    python scripts/accuracy_sweep.py [--backend cpu|triton] [--seeds S] [--seed0 S0]
        [--cases a,b,...] [--only NAME ...] [--dtypes f32,f16,bf16] [--threads T]
        [--gemm vec|blas]

Runs each case of the backend's table below on fresh inputs for seeds S0..S0+S-1 and prints a
Markdown table: per case, dtype and output, the worst ratio max|out - ref64| / tolerance and the
seed where it occurred (1.0 is the edge of the rule; NaN counts as inf), then the worst ratio
overall; the exit status is 1 when that is above 1.

- cpu (defaults: 150 seeds from 1000, 1 thread, the kernel's own GEMM path): shapes that
  stress the CPU kernels (long dk or dv, ragged tiles, a mid-size problem), each in its own
  dtype; for finding the cause of a rare failure of tests/test_cpu.py. --threads matters: the
  backward's partial sums depend on it. The environment's NONLOCAL_KERNELS_CPU_* knobs apply
  (e.g. NONLOCAL_KERNELS_CPU_KEEP_MB=0 for the path that recomputes the scores).
- triton (defaults: 50 seeds from 0, --dtypes f32,f16, torch's thread count): the
  configurations of tests/test_triton.py (small shapes), under the Triton interpreter without a
  GPU.
"""

import argparse
import os
import sys
import time

import torch

# Run from a checkout: import this checkout's package (scripts/.. on the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (B, N, M, dk, dv, layout, extra). extra: dtype (the case runs in that dtype only; the
# others run in each of --dtypes), scale (else the backend's default), mode, caps (Triton
# interpreter head-dim caps), strategy (Triton backward).
CPU_CASES = {
    "dk3_dv1024": (2, 23, 29, 3, 1024, "channels_first", dict(dtype="f32")),
    "dk1024_dv3": (2, 23, 29, 1024, 3, "channels_first", dict(dtype="f32")),
    "dk2_dv2053": (2, 23, 29, 2, 2053, "channels_first", dict(dtype="f32")),
    "dk2053_dv2": (2, 23, 29, 2053, 2, "channels_first", dict(dtype="f32")),
    "dk3_dv1024_bf16": (2, 23, 29, 3, 1024, "channels_first", dict(dtype="bf16")),
    "dk3_dv1024_f16": (2, 23, 29, 3, 1024, "channels_first", dict(dtype="f16")),
    "dk1024_dv3_f16": (2, 23, 29, 1024, 3, "channels_first", dict(dtype="f16")),
    "ragged_f32": (2, 45, 37, 19, 11, "strided", dict(dtype="f32")),
    "ragged_f16": (2, 45, 37, 19, 11, "contiguous", dict(dtype="f16")),
    "ragged_bf16": (2, 45, 37, 19, 11, "channels_first", dict(dtype="bf16")),
    "mid_f32": (1, 301, 530, 64, 48, "channels_first", dict(dtype="f32")),
    "mid_bf16": (1, 301, 530, 64, 48, "channels_first", dict(dtype="bf16")),
}
TRITON_CASES = {
    "held": (2, 35, 26, 40, 24, "strided", dict(caps=(64, 64))),
    "split_acc": (2, 35, 26, 40, 24, "strided", dict(caps=(16, 16))),
    "split_rec": (2, 35, 26, 40, 24, "strided", dict(caps=(16, 16), strategy="recompute")),
    "shape0": (2, 37, 29, 24, 40, "channels_first", {}),
    "shape1": (1, 50, 67, 72, 24, "strided", {}),
    "shape2": (2, 33, 17, 40, 72, "contiguous", {}),
    "shape3": (1, 16, 16, 16, 16, "contiguous", {}),
    "big_dk": (1, 40, 35, 256, 16, "channels_first", dict(scale=256 ** -0.5)),
    "big_dv": (1, 40, 35, 16, 256, "channels_first", dict(scale=16 ** -0.5)),
    "scale1": (2, 21, 18, 20, 12, "channels_first", dict(scale=1.0)),
    "scale-0.7": (2, 21, 18, 20, 12, "channels_first", dict(scale=-0.7)),
    "gaussian": (2, 21, 18, 20, 12, "channels_first", dict(scale=1.0, mode="gaussian")),
    "tiny0": (3, 5, 3, 1, 1, "channels_first", {}),
    "tiny1": (1, 1, 5, 7, 5, "contiguous", {}),
    "tiny2": (2, 4, 2, 1, 9, "strided", {}),
}
# backend: its cases and the defaults of --seeds, --seed0, --threads (None: torch's) and of a
# case's scale (from dk).
BACKENDS = {
    "cpu": dict(cases=CPU_CASES, seeds=150, seed0=1000, threads=1, scale=lambda dk: dk ** -0.5),
    "triton": dict(cases=TRITON_CASES, seeds=50, seed0=0, threads=None, scale=lambda dk: 0.5),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "f64": torch.float64}
DEFAULT_DTYPES = "f32,f16"
OUTPUTS = ("y", "lse", "dtheta", "dphi", "dg")


def worst_ratios(backend, case, dtype, seeds, seed0, device):
    from nonlocal_kernels.testing import compare_with_oracle, make_inputs

    B, N, M, dk, dv, layout, extra = BACKENDS[backend]["cases"][case]
    scale = extra.get("scale", BACKENDS[backend]["scale"](dk))
    if backend == "triton":
        from nonlocal_kernels.backends.triton import launch as L

        saved = dict(L.INTERPRET_CAPS)
        if "caps" in extra and L.INTERPRET:
            L.INTERPRET_CAPS.update({k: extra["caps"] for k in ("fwd", "kv", "q")})
        os.environ["NONLOCAL_KERNELS_TRITON_BWD"] = extra.get("strategy", "accumulate")
    worst = {}
    try:
        for seed in range(seed0, seed0 + seeds):
            torch.manual_seed(seed)
            theta, phi, g = make_inputs(B, N, M, dk, dv, dtype=dtype, device=device,
                                        layout=layout)
            checks = compare_with_oracle(theta, phi, g, backend=backend,
                                         mode=extra.get("mode", "embedded_gaussian"),
                                         scale=scale, return_lse=True)
            for c in checks:
                r = c.error / c.tol if c.tol > 0 else float("inf")
                if r != r:
                    r = float("inf")
                if r > worst.get(c.name, (-1.0,))[0]:
                    worst[c.name] = (r, seed)
    finally:
        if backend == "triton":
            L.INTERPRET_CAPS.clear()
            L.INTERPRET_CAPS.update(saved)
            os.environ.pop("NONLOCAL_KERNELS_TRITON_BWD", None)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="cpu")
    ap.add_argument("--seeds", type=int, help="draws per case and dtype (default: the backend's)")
    ap.add_argument("--seed0", type=int, help="first seed (default: the backend's)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--only", nargs="*", help="case names (with --cases: either list)")
    ap.add_argument("--dtypes", help=f"comma-separated, from {','.join(DTYPES)}: the dtypes of "
                    f"the cases without one of their own (default {DEFAULT_DTYPES}); given, a "
                    "case with its own dtype runs only when that is listed")
    ap.add_argument("--threads", type=int, help="torch threads (default: the backend's)")
    ap.add_argument("--gemm", choices=("vec", "blas"),
                    help="cpu: NONLOCAL_KERNELS_CPU_GEMM (default: the kernel's own choice)")
    args = ap.parse_args(argv)
    cfg = BACKENDS[args.backend]
    names = (args.cases.split(",") if args.cases else []) + (args.only or [])
    unknown = [n for n in names if n not in cfg["cases"]]
    if unknown:
        ap.error(f"no {args.backend} case {', '.join(unknown)} (cases: {', '.join(cfg['cases'])})")
    dtypes = (args.dtypes or DEFAULT_DTYPES).split(",")
    if any(dt not in DTYPES for dt in dtypes):
        ap.error(f"--dtypes: expected names from {', '.join(DTYPES)}, got {args.dtypes}")
    if args.gemm is not None and args.backend != "cpu":
        ap.error("--gemm is for --backend cpu")
    seeds = cfg["seeds"] if args.seeds is None else args.seeds
    seed0 = cfg["seed0"] if args.seed0 is None else args.seed0
    threads = cfg["threads"] if args.threads is None else args.threads
    device = "cpu"
    if args.backend == "cpu":
        if args.gemm is not None:
            os.environ["NONLOCAL_KERNELS_CPU_GEMM"] = args.gemm
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if threads is not None:
        torch.set_num_threads(threads)

    print("| case | dtype | seeds | " + " | ".join(OUTPUTS) + " | time |")
    print("|---" * (len(OUTPUTS) + 4) + "|")
    overall = 0.0
    for case in dict.fromkeys(names or cfg["cases"]):
        extra = cfg["cases"][case][-1]
        for dt in [extra["dtype"]] if "dtype" in extra else dtypes:
            if args.dtypes and dt not in dtypes:
                continue
            t0 = time.time()
            w = worst_ratios(args.backend, case, DTYPES[dt], seeds, seed0, device)
            overall = max([overall] + [r for r, _ in w.values()])
            cells = [f"{w[n][0]:.3f} (s{w[n][1]})" for n in OUTPUTS]
            print(f"| {case} | {dt} | {seeds} | " + " | ".join(cells) +
                  f" | {time.time() - t0:.0f}s |", flush=True)
    print(f"worst ratio overall: {overall:.3f}")
    return 0 if overall <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
