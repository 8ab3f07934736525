"""python -m benchmarks.context_parallel: a NonLocal3d block split over P processes (gloo).

One clip (1, C, T, H, W), float32, sub-sampled (keys pooled 2x2 over space: M = N / 4),
forward+backward, norm None, with its frames split over P processes of a gloo group
(``NonLocal3d(cp_group=...)``; P = 1 is the plain block, no group). Each configuration runs in
fresh processes (nonlocal_kernels.testing.run_spawned); each rank measures:

- peak memory: the growth of its peak RSS over its RSS just before the block's forward, with
  the module, its input slab and the upstream gradient already allocated (first a warm-up on a
  small clip through the same code, so thread pools and communication buffers exist), with
  glibc's MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows the live tensors;
- time of the forward+backward (after a barrier), and the payload its collectives moved
  (distributed.record_communication) with the time spent in them (which includes waiting
  for slower ranks);
- with ``--mem-limit-gb L``: an address-space limit (RLIMIT_AS) of L GiB above the process's
  size after the warm-up, before its input slab and upstream gradient are allocated: beyond
  it an allocation fails (reported as OOM) instead of swapping or taking the machine down.

Beside each peak, the model's prediction (:func:`predicted_peak_bytes`). Writes
context_parallel.json, context_parallel.md and memory.png into --out.

    python -m benchmarks.context_parallel --procs 1,2,4 --clips 4x56x56,8x56x56,16x56x56
    python -m benchmarks.context_parallel --procs 1,4 --clips 32x56x56 --mem-limit-gb 1.0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time

import torch

from .cli import machine_description
from .runner import _current_rss, _is_oom, _peak_rss

FLOAT = 4  # bytes, float32


def _parse_clip(text: str) -> tuple:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1 or parts[1] % 2 or parts[2] % 2:
        raise ValueError(f"--clips: expected TxHxW with even H and W, got {text!r}")
    return parts


def predicted_peak_bytes(C: int, T: int, H: int, W: int, P: int, threads: int) -> dict:
    """The model: the tensors alive on one rank while the softmax backward kernel runs, the
    moment the design puts the peak at. n = the rank's positions (T_r H W, T_r = ceil(T / P)),
    m = n / 4 its keys, M = N / 4 all keys, c = C / 2 (dk = dv = c).

    Saved by the forward: theta, g and phi before pooling, y (c n each); the max-pool indices
    (int64, c m per pool); pooled g and phi (c m each); lse (n). Alive: the block's output z and
    x's gradient (C n each), dy and dtheta (c n each), the keys' gradients (2 c M) and the CPU
    kernel's backward workspace (docs/cpu.md, Memory: panels of M (2 dk + dv) and G = 2 x threads
    partial sums of M (dk + dv)); with a group also the keys gathered again (2 c M). (At the
    all-to-all that follows, its send and receive buffers, 4 c M, replace the workspace, which is
    larger.) Not counted: buffers inside PyTorch's conv and pool layers, and gloo's."""
    c = C // 2
    n = -(-T // P) * H * W
    m = n // 4
    M = T * H * W // 4
    terms = {
        "saved: theta, g and phi before pooling, y": 4 * c * n,
        "saved: max-pool indices (int64)": 2 * 2 * c * m,
        "saved: pooled g and phi": 2 * c * m,
        "saved: lse": n,
        "output z, x's gradient": 2 * C * n,
        "dy, dtheta": 2 * c * n,
        "keys' gradients (all M)": 2 * c * M,
        "kernel backward workspace": (3 + 4 * threads) * c * M,
    }
    if P > 1:
        terms["keys gathered again"] = 2 * c * M
    return {k: v * FLOAT for k, v in terms.items()}


def _set_address_space_limit(extra_bytes: int) -> int:
    """RLIMIT_AS = this process's current address-space size + extra_bytes; returns the limit."""
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = size + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def _worker(rank: int, size: int, spec: dict) -> dict:
    import torch.distributed as dist

    from nonlocal_kernels import NonLocal3d, distributed

    torch.manual_seed(1234 + rank)
    C, (T, H, W) = spec["channels"], spec["clip"]
    group = dist.group.WORLD if spec["cp"] else None
    block = NonLocal3d(C, sub_sample=True, zeros_init=False, cp_group=group)
    T_r = distributed.frame_split(T, size)[rank]
    # Warm-up: the same code on a small clip (one frame a rank, 8 x 8).
    small = torch.randn(1, C, 1, 8, 8, requires_grad=True)
    block(small).sum().backward()
    block.zero_grad(set_to_none=True)
    out = {"rank": rank, "frames": T_r, "status": "ok"}
    limit = spec.get("mem_limit_bytes")
    if limit:  # from here on, the input slab and its gradient included
        out["address_space_limit_bytes"] = _set_address_space_limit(limit)
    try:
        x = torch.randn(1, C, T_r, H, W, requires_grad=True)
        dz = torch.randn_like(x)
        out["input_bytes"] = 2 * x.numel() * x.element_size()
        base = _current_rss()
        if group is not None:
            dist.barrier()
        t0 = time.perf_counter()
        with distributed.record_communication() as comm:
            z = block(x)
            z.backward(dz)
        out["seconds"] = time.perf_counter() - t0
        out["comm"] = comm
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        out["status"] = "OOM"
        out["error"] = str(exc).splitlines()[0][:200]
        if group is not None:  # the others wait in a collective: end the group's run here
            raise
        return out
    out["peak_bytes"] = max(_peak_rss() - base, 0)
    return out


def run_config(C: int, clip: tuple, P: int, *, mem_limit_gb=None, timeout_s=1800,
               threads=None) -> dict:
    from nonlocal_kernels.testing import run_spawned

    # Every block of 64 KiB or more is its own mapping, returned to the OS when freed: RSS then
    # follows the live tensors. (glibc's default keeps freed blocks under its dynamic threshold,
    # up to 32 MiB, in its heap, and RSS keeps counting them.) Read by the spawned processes.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    spec = {"channels": C, "clip": clip, "cp": P > 1,
            "mem_limit_bytes": int(mem_limit_gb * 2**30) if mem_limit_gb else None}
    threads = threads or max(1, (os.cpu_count() or 1) // P)
    t0 = time.perf_counter()
    try:
        ranks = run_spawned(_worker, P, spec, timeout_s=timeout_s, group_timeout_s=timeout_s,
                            threads=threads)
        status = "ok" if all(r["status"] == "ok" for r in ranks) else "OOM"
    except (RuntimeError, TimeoutError) as exc:
        ranks, status = [], ("OOM" if _is_oom(exc) else f"error: {str(exc)[-300:]}")
    T, H, W = clip
    return {"C": C, "clip": list(clip), "N": T * H * W, "M": T * H * W // 4, "P": P,
            "threads_per_rank": threads, "mem_limit_gb": mem_limit_gb, "status": status,
            "wall_s": time.perf_counter() - t0, "ranks": ranks,
            "predicted_bytes": predicted_peak_bytes(C, T, H, W, P, threads)}


def _mb(b) -> str:
    return f"{b / 2**20:.0f}"


def format_table(rows: list) -> str:
    head = ("| clip T x H x W | N | M | P | limit GiB | status | peak MB per rank (max) | "
            "model MB | fwd+bwd s (max) | sent MB per rank | in collectives s (max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ranks = r["ranks"]
        done = [k for k in ranks if k.get("status") == "ok"]
        peak = max((k["peak_bytes"] for k in done), default=None)
        secs = max((k["seconds"] for k in done), default=None)
        sent = max((sum(s["bytes_out"] for s in k["comm"].values()) for k in done), default=0)
        in_comm = max((sum(s["seconds"] for s in k["comm"].values()) for k in done), default=0)
        lines.append(
            f"| {'x'.join(map(str, r['clip']))} | {r['N']} | {r['M']} | {r['P']} | "
            f"{r['mem_limit_gb'] or ''} | {r['status']} | "
            f"{'' if peak is None else _mb(peak)} | {_mb(sum(r['predicted_bytes'].values()))} | "
            f"{'' if secs is None else f'{secs:.1f}'} | {_mb(sent) if done else ''} | "
            f"{f'{in_comm:.2f}' if done else ''} |")
    return "\n".join(lines)


def write_plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, P in enumerate(sorted({r["P"] for r in rows})):
        best = {}  # per N: the run without a limit where there is one
        for r in rows:
            if r["P"] == P and r["status"] == "ok" and (r["N"] not in best
                                                       or not r["mem_limit_gb"]):
                best[r["N"]] = r
        pts = sorted((N, max(k["peak_bytes"] for k in r["ranks"]) / 2**20,
                      sum(r["predicted_bytes"].values()) / 2**20) for N, r in best.items())
        if not pts:
            continue
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color,
                label=f"P = {P}, measured")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=color,
                label=f"P = {P}, model")
    ax.set_xlabel("N (positions of the clip; M = N / 4)")
    ax.set_ylabel("peak memory per rank (MB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("NonLocal3d(512, sub_sample) fwd+bwd, fp32, split over P gloo processes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2,4", help="process counts, e.g. 1,2,4")
    ap.add_argument("--clips", default="4x56x56,8x56x56,16x56x56",
                    help="clips TxHxW (H, W even)")
    ap.add_argument("--channels", type=int, default=512, help="C (inter_channels = C / 2)")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="address-space limit per process above its size before the block")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per rank (default: the cores divided by P, at least 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--out", default="benchmarks/out/context_parallel")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    json_path = os.path.join(args.out, "context_parallel.json")
    if os.path.exists(json_path):  # add to an earlier run's rows (other clips, a limit)
        with open(json_path) as f:
            rows = json.load(f)["rows"]
    for clip in map(_parse_clip, args.clips.split(",")):
        for P in (int(p) for p in args.procs.split(",")):
            row = run_config(args.channels, clip, P, mem_limit_gb=args.mem_limit_gb,
                             timeout_s=args.timeout, threads=args.threads)
            rows = [r for r in rows if (r["clip"], r["P"], r["mem_limit_gb"])
                    != (row["clip"], row["P"], row["mem_limit_gb"])] + [row]
            print(format_table([row]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (r["mem_limit_gb"] or 0, r["N"], r["P"]))
    meta = {"machine": machine_description(torch.device("cpu")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.context_parallel " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = format_table(rows)
    with open(os.path.join(args.out, "context_parallel.md"), "w") as f:
        f.write(f"{meta['machine']}; {meta['date']}\n\n{table}\n")
    write_plot(rows, os.path.join(args.out, "memory.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
