"""`make demo`: a NonLocal3d block, forward+backward, on the best available backend against the
reference, on an I3D res3-sized video tensor (C=512, T=4, 28x28, sub-sampled: N=3136, M=784).

Prints time, peak memory (each backend measured in a fresh process) and the max error of the
output and of the input gradient against the float64 oracle.

    python -m nonlocal_kernels.demo [--batch 2] [--device cpu|cuda] [--dtype float32]
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


def _block_and_input(args, seed=0):
    torch.manual_seed(seed)
    block = NonLocal3d(512, sub_sample=True, zeros_init=False, std=0.02)
    x = torch.randn(args.batch, 512, 4, 28, 28)
    return block, x


def _current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(args) -> dict:
    """Runs in its own process: median fwd+bwd time and peak memory growth for one backend."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block, x = _block_and_input(args)
    block.backend = args.measure
    block, x = block.to(device, dtype), x.to(device, dtype).requires_grad_()

    def step():
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "peak_mb": max(peak, 0) / 2**20}


def _errors(args, backend) -> dict:
    """Max |error| of z and dz/dx on `backend` (in args.dtype) vs the float64 oracle."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block, x = _block_and_input(args)
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
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print("DEMO-RESULT " + json.dumps(_measure(args)), flush=True)
        return 0

    N, M, C = 4 * 28 * 28, 4 * 14 * 14, 256
    probe = torch.empty(args.batch, N, C, device=args.device, dtype=getattr(torch, args.dtype))
    best = registry.select("auto", probe, probe[:, :M], probe[:, :M], "embedded_gaussian").name
    print(f"NonLocal3d(512, sub_sample=True) on x of shape ({args.batch}, 512, 4, 28, 28): "
          f"N={N}, M={M}, inter_channels={C}, {args.dtype} on {args.device}")
    print("backends: " + ", ".join(
        f"{b['name']}{'' if b['available'] else ' (unavailable: ' + b['reason'] + ')'}"
        for b in registry.available_backends()))
    print(f"auto picks: {best}\n")
    results = {}
    for name in dict.fromkeys([best, "reference"]):
        cmd = [sys.executable, "-m", "nonlocal_kernels.demo", "--measure", name,
               "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DEMO-RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            return 1
        results[name] = json.loads(line[0].split(" ", 1)[1])
    print("| backend | fwd+bwd ms (median of 3) | peak memory MB (growth over the inputs) |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']:.1f} | {r['peak_mb']:.0f} |")
    err = _errors(args, best)
    print(f"\n{best} vs the float64 oracle: max|z error| {err['z']:.2e} (|z - x| up to "
          f"{err['z_scale']:.2e}), max|dx error| {err['dx']:.2e} (|dx| up to "
          f"{err['dx_scale']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
