"""`make demo`: NonLocal3d blocks, forward+backward, on the best available backend against the
reference, at two sizes:

- everyday: an I3D res3 block (C=512, T=4, 28x28, sub-sampled: N=3136, M=784), batch 2, with
  the max error of the output and of the input gradient against the float64 oracle;
- a long clip: NonLocal3d(256, sub_sample=True) on 16x56x56 frames (N=50176, M=12544), where the
  reference materialises an N x M affinity of 2.5 GB per copy and needs gigabytes in all.

Prints time and peak memory, each backend measured in a fresh process.

    python -m nonlocal_kernels.demo [--batch 2] [--device cpu|cuda] [--dtype float32]
                                    [--cases everyday,long]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from . import NonLocal3d
from .backends import registry

# name -> (label, channels, frames, size, timed steps): the long clip runs one step per backend
# (tens of seconds each on a 2-core CPU).
CASES = {
    "everyday": ("I3D res3 block, NonLocal3d(512, sub_sample=True)", 512, 4, 28, 3),
    "long": ("long clip, NonLocal3d(256, sub_sample=True)", 256, 16, 56, 1),
}


def _block_and_input(args, case, seed=0):
    _, channels, frames, size, _ = CASES[case]
    torch.manual_seed(seed)
    block = NonLocal3d(channels, sub_sample=True, zeros_init=False, std=0.02)
    batch = args.batch if case == "everyday" else 1
    x = torch.randn(batch, channels, frames, size, size)
    return block, x


def _current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(args) -> dict:
    """Runs in its own process: median fwd+bwd time and peak memory growth for one backend."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block, x = _block_and_input(args, args.case)
    block.backend = args.measure
    block, x = block.to(device, dtype), x.to(device, dtype).requires_grad_()

    def step():
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step():
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        first = timed_step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss()
        first = timed_step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # The first step is a warm-up, except where one step is all the case affords.
    steps = CASES[args.case][4]
    times = [first] if steps == 1 else [timed_step() for _ in range(steps)]
    return {"ms": statistics.median(times) * 1e3, "peak_mb": max(peak, 0) / 2**20}


def _errors(args, backend) -> dict:
    """Max |error| of z and dz/dx on `backend` (in args.dtype) vs the float64 oracle."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block, x = _block_and_input(args, "everyday")
    out = {}
    for name, be, dt in (("run", backend, dtype), ("oracle", "reference", torch.float64)):
        block.backend = be
        b = block.to(device, dt)
        xi = x.detach().to(device, dt).requires_grad_()
        z = b(xi)
        (z * z.detach()).sum().backward()
        out[name] = (z.detach().double(), xi.grad.double())
    zr, gr = out["run"]
    zo, go = out["oracle"]
    return {"z": (zr - zo).abs().max().item(), "dx": (gr - go).abs().max().item(),
            "z_scale": (zo - x.to(device, torch.float64)).abs().max().item(),
            "dx_scale": go.abs().max().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nonlocal_kernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="batch of the everyday case")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print("DEMO-RESULT " + json.dumps(_measure(args)), flush=True)
        return 0
    cases = args.cases.split(",")
    if any(c not in CASES for c in cases):
        p.error(f"--cases: expected names from {', '.join(CASES)}, got {args.cases!r}")

    probe = torch.empty(1, 2, 2, device=args.device, dtype=getattr(torch, args.dtype))
    best = registry.select("auto", probe, probe, probe, "embedded_gaussian").name
    print("backends: " + ", ".join(
        f"{b['name']}{'' if b['available'] else ' (unavailable: ' + b['reason'] + ')'}"
        for b in registry.available_backends()))
    print(f"auto picks: {best}; {args.dtype} on {args.device}\n")
    for case in cases:
        label, channels, frames, size, steps = CASES[case]
        batch = args.batch if case == "everyday" else 1
        N, M = frames * size * size, frames * (size // 2) ** 2
        print(f"{label} on x of shape ({batch}, {channels}, {frames}, {size}, {size}): N={N}, "
              f"M={M}; the reference's N x M affinity alone is "
              f"{batch * N * M * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20:.0f} "
              f"MB per copy")
        results = {}
        for name in dict.fromkeys([best, "reference"]):
            cmd = [sys.executable, "-m", "nonlocal_kernels.demo", "--measure", name, "--case",
                   case, "--batch", str(args.batch), "--device", args.device, "--dtype",
                   args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DEMO-RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                return 1
            results[name] = json.loads(line[0].split(" ", 1)[1])
        timing = "median of 3, after a warm-up" if steps > 1 else "one step"
        print(f"| backend | fwd+bwd ms ({timing}) | peak memory MB (growth over the inputs) |")
        print("|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['ms']:.1f} | {r['peak_mb']:.0f} |")
        if case == "everyday":
            err = _errors(args, best)
            print(f"\n{best} vs the float64 oracle: max|z error| {err['z']:.2e} (|z - x| up to "
                  f"{err['z_scale']:.2e}), max|dx error| {err['dx']:.2e} (|dx| up to "
                  f"{err['dx_scale']:.2e})")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
