"""Localise the Triton backend's GPU failures (first gpu_check run, H200, Triton 3.6):

  * wrong dtheta for 16-bit channels-first inputs (test_triton.py, 2x37x29x24x40 float16 and
    bfloat16, 2x300x200x64x64 bfloat16: max|err| 1e2..4e4, every other output fine);
  * an illegal memory access at 1x257x300x256x256 bfloat16, strided.

    python scripts/triton_triage.py [--out FILE]

Part A varies, for each wrong-dtheta case, which of theta / phi is channels-first, the forced
configuration (NONLOCAL_KERNELS_TRITON_CONFIG) and whether lse takes a gradient, and prints the
error/tolerance ratio (docs/design.md section 5 rule, > 1 fails) of every output. Part B runs the faulting case
in child processes whose every kernel launch is followed by a synchronize, and prints which
kernel faulted. Each case runs in its own process: an illegal access ends its CUDA context.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

CASES_A = [  # (B, N, M, dk, dv, dtype)
    (2, 37, 29, 24, 40, "float16"),
    (2, 300, 200, 64, 64, "bfloat16"),
]
# (theta layout, phi layout); g takes phi's layout.
LAYOUTS = [("channels_first", "channels_first"), ("contiguous", "channels_first"),
           ("channels_first", "contiguous"), ("contiguous", "contiguous")]
CASE_B = (1, 257, 300, 256, 256, "bfloat16")


def _part_a_case(spec: str) -> None:
    import torch
    from nonlocal_kernels.testing import compare_with_oracle, make_inputs

    B, N, M, dk, dv, dt = spec.split(",")
    B, N, M, dk, dv = map(int, (B, N, M, dk, dv))
    dtype = getattr(torch, dt)
    variants = [(lay, None, True) for lay in LAYOUTS]
    variants += [(LAYOUTS[0], str(i), True) for i in range(4)]
    variants += [(LAYOUTS[0], None, False), (LAYOUTS[2], None, False)]
    for (lt, lp), config, lse in variants:
        if config is None:
            os.environ.pop("NONLOCAL_KERNELS_TRITON_CONFIG", None)
        else:
            os.environ["NONLOCAL_KERNELS_TRITON_CONFIG"] = config
        theta = make_inputs(B, N, M, dk, dv, dtype=dtype, device="cuda", layout=lt)[0]
        _, phi, g = make_inputs(B, N, M, dk, dv, dtype=dtype, device="cuda", layout=lp)
        t0 = time.time()
        try:
            checks = compare_with_oracle(theta, phi, g, backend="triton", scale=dk ** -0.5,
                                         return_lse=lse)
            torch.cuda.synchronize()
            ratios = " | ".join(f"{c.name} {c.error / c.tol:.3g}" for c in checks)
            verdict = "ok" if all(c.ok for c in checks) else "FAIL"
        except Exception as exc:  # an illegal access ends this process's usefulness
            ratios, verdict = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "ERROR"
        print(f"| {B}x{N}x{M}x{dk}x{dv} {dt} | theta {lt}, phi {lp} | config "
              f"{config or 'default'} | lse grad {lse} | {verdict} | {ratios} | "
              f"{time.time() - t0:.1f}s |", flush=True)
        if verdict == "ERROR":
            return


def _part_b_case(spec: str) -> None:
    import torch
    import nonlocal_kernels as nk
    from nonlocal_kernels.backends.triton import launch as L
    from nonlocal_kernels.testing import make_inputs

    B, N, M, dk, dv, dt, layout, lse = spec.split(",")
    B, N, M, dk, dv = map(int, (B, N, M, dk, dv))
    names = {v: k for k, v in L._JIT.items()}
    real = L._launcher

    def launcher(kern, like):
        launch = real(kern, like)
        name = names.get(kern) or names.get(getattr(kern, "fn", None), "?")

        class Synced:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    print(f"  launch {name} ...", flush=True)
                    launch[grid](*args, **kwargs)
                    torch.cuda.synchronize()
                    print(f"  launch {name} ok", flush=True)
                return run
        return Synced()

    L._launcher = launcher
    theta, phi, g = (t.requires_grad_() for t in make_inputs(
        B, N, M, dk, dv, dtype=getattr(torch, dt), device="cuda", layout=layout))
    out = nk.nonlocal_attention(theta, phi, g, backend="triton", scale=dk ** -0.5,
                                return_lse=lse == "1")
    y = out[0] if isinstance(out, tuple) else out
    loss = y.float().square().sum() + (out[1].sum() if isinstance(out, tuple) else 0)
    loss.backward()
    torch.cuda.synchronize()
    print("  all kernels ok", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--case-a", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case-b", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case_a:
        _part_a_case(args.case_a)
        return 0
    if args.case_b:
        _part_b_case(args.case_b)
        return 0

    env = dict(os.environ, NONLOCAL_KERNELS_TRITON_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    lines = ["# Triton GPU triage", "",
             "## A. wrong dtheta: error / tolerance per output (> 1 fails)", "",
             "| case | layouts | config | lse grad | verdict | ratios | time |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for case in CASES_A:
        spec = ",".join(map(str, case))
        r = subprocess.run([sys.executable, __file__, "--case-a", spec], env=env,
                           capture_output=True, text=True, timeout=240)
        rows = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
        if r.returncode:
            rows.append(f"| {spec} | exit {r.returncode} | | | | "
                        f"{(r.stderr.strip().splitlines() or [''])[-1][:200]} | |")
        print("\n".join(rows), flush=True)
        lines += rows
    lines += ["", "## B. illegal memory access: a synchronize after every launch", ""]
    B, N, M, dk, dv, dt = CASE_B
    for layout, lse, dv_ in (("strided", "1", dv), ("strided", "0", dv),
                             ("contiguous", "1", dv), ("strided", "0", dv + 1)):
        spec = f"{B},{N},{M},{dk},{dv_},{dt},{layout},{lse}"
        r = subprocess.run([sys.executable, __file__, "--case-b", spec],
                           env=dict(env, CUDA_LAUNCH_BLOCKING="1"),
                           capture_output=True, text=True, timeout=240)
        out = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
        err = [ln for ln in r.stderr.splitlines() if "Error" in ln or "error" in ln][-2:]
        row = f"- {spec}: exit {r.returncode}; last: {out[-3:]}; {err}"
        print(row, flush=True)
        lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
