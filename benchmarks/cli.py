"""python -m benchmarks: time and memory of every backend against the baselines.

Prints a markdown table and writes results.md, results.json, time.png and memory.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from nonlocal_kernels import modes
from nonlocal_kernels.progress import Progress

from .cases import PRESETS, parse_shape
from .runner import KEEP_HEAP_ENV, measure, measure_in_subprocess, time_interleaved



def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def _fmt_ms(v):
    return "" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _fmt_mb(v):
    return "" if v is None else f"{v / 2**20:.0f}"


def _fmt_tflops(flops, ms):
    return "" if not ms else f"{flops / (ms * 1e-3) / 1e12:.3f}"


def format_table(rows: list) -> str:
    head = ("| shape (B, N, M, dk, dv) | method | fwd ms | fwd TFLOP/s | fwd peak MB "
            "| fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd peak MB | fwd+bwd vs naive | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    naive = {(r["shape"]): r.get("fwd_bwd_ms") for r in rows if r["method"] == "naive"}
    for r in rows:
        base = naive.get(r["shape"])
        mine = r.get("fwd_bwd_ms")
        ratio = f"{base / mine:.2f}x" if base and mine else ""
        method = r["method"] + (f" ({r['path']})" if r.get("path") else "")
        lines.append(
            f"| {r['shape']} | {method} | {_fmt_ms(r.get('fwd_ms'))} | "
            f"{_fmt_tflops(r['fwd_flops'], r.get('fwd_ms'))} | "
            f"{_fmt_mb(r.get('peak_fwd_bytes'))} | {_fmt_ms(r.get('fwd_bwd_ms'))} | "
            f"{_fmt_tflops(r['fwd_bwd_flops'], r.get('fwd_bwd_ms'))} | "
            f"{_fmt_mb(r.get('peak_fwd_bwd_bytes'))} | {ratio} | {r['status']} |")
    return "\n".join(lines)


def write_plots(rows: list, out_dir: str, title: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in (("fwd_bwd_ms", "forward+backward time (ms)", "time.png"),
                               ("peak_fwd_bwd_bytes", "forward+backward peak memory (MB)",
                                "memory.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["N"], r[key] / (2**20 if "bytes" in key else 1))
                         for r in rows if r["method"] == method and r.get(key) is not None)
            failed = [str(r["N"]) for r in rows if r["method"] == method and r.get(key) is None]
            label = method + (f" (failed at N={', '.join(failed)})" if failed else "")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (query positions)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the 'quick' preset (under 2 min on 2 "
                   "CPU cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named list of shapes")
    p.add_argument("--shape", action="append", default=[], help="B,N,M,dk,dv (repeatable)")
    p.add_argument("--mode", default="embedded_gaussian", choices=modes.NAMES)
    p.add_argument("--backends", help="comma-separated methods (default: every available "
                   "backend plus the baselines naive and torch_sdpa*)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA "
                   "default), float16, float64")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per step (median); a "
                   "round calls every method once")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per step before the "
                   "timed ones")
    p.add_argument("--settle", type=int, default=1, help="untimed calls of a method right "
                   "before each of its timed calls (the allocator then holds that method's own "
                   "buffers, as in a loop of it alone; 0: a timed call follows another method's)")
    p.add_argument("--cpu-heap", default="keep", choices=["keep", "default"],
                   help="glibc's heap in CPU timing processes: keep (never handed back to the "
                   "OS, blocks up to 32 MiB from the heap, so no timed call pays page faults for "
                   "another method's frees; benchmarks/runner.py KEEP_HEAP_ENV) or default "
                   "(glibc's own thresholds, or the MALLOC_* variables of this environment)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per step "
                   "and method; stops repeating early past it")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU case process")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space limit of a "
                   "CPU case process; beyond it the case is reported as OOM")
    p.add_argument("--fwd-only", action="store_true", help="skip forward+backward")
    p.add_argument("--out", default="benchmarks/out", help="folder for results and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", default="auto", choices=["auto", "live", "compact", "off"],
                   help="progress on stderr: cases done, the case running, elapsed time (auto: "
                   "a live line on a terminal, a line per case otherwise)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = args.preset or "quick"
        args.repeats = min(args.repeats, 3)
        args.budget = min(args.budget, 3.0)
        args.warmup = min(args.warmup, 1)
    if not args.preset and not args.shape:
        p.error("give --quick, --preset or --shape")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise SystemExit(f"--dtype: unknown dtype {dtype!r}")
    cases = list(PRESETS[args.preset]) if args.preset else []
    cases += [parse_shape(s) for s in args.shape]

    from .baselines import default_methods, get_method
    methods = (args.backends.split(",") if args.backends
               else default_methods(args.mode, device.type))
    for m in methods:
        get_method(m)  # unknown names fail before anything runs
    steps = ["fwd"] if args.fwd_only else ["fwd", "fwd_bwd"]
    machine = machine_description(device)
    print(f"# nonlocal_kernels benchmark: mode {args.mode}, {dtype}, {device.type}\n"
          f"machine: {machine}\nmethods: {', '.join(methods)}\n", flush=True)

    rows = []
    progress = Progress(len(cases), "cases", mode=args.progress)
    for done, case in enumerate(cases):
        common = {"case": [case.B, case.N, case.M, case.dk, case.dv], "mode": args.mode,
                  "dtype": dtype, "device": str(device)}
        case_rows = {}
        for method in methods:  # peak memory: one process per (method, step) on CPU
            row = {"shape": case.shape, "label": case.label, "N": case.N, "method": method,
                   "fwd_flops": case.fwd_flops(), "fwd_bwd_flops": case.fwd_bwd_flops(),
                   "status": "ok"}
            for step in steps:
                progress.update(done, f"{case.shape}: {method} {step} memory")
                spec = dict(common, method=method, steps=[step])
                res = (measure(spec) if device.type == "cuda" else
                       measure_in_subprocess(spec, args.timeout, args.mem_limit_gb))
                status = res.pop("status")
                row.update(res)
                if status != "ok":
                    row["status"] = f"{step}: {status}"
            case_rows[method] = row
        # Time: the methods that ran within memory, side by side in rounds, one process.
        timed = {step: [m for m in methods if not case_rows[m]["status"].startswith(f"{step}:")]
                 for step in steps}
        timed = {step: names for step, names in timed.items() if names}
        if timed:
            progress.update(done, f"{case.shape}: timing")
            spec = dict(common, methods=sorted({m for ms in timed.values() for m in ms},
                                               key=methods.index),
                        steps=timed, repeats=args.repeats, warmup=args.warmup,
                        settle=args.settle, budget_s=args.budget)
            res = (time_interleaved(spec) if device.type == "cuda" else
                   measure_in_subprocess(spec, args.timeout * len(methods), args.mem_limit_gb,
                                         KEEP_HEAP_ENV if args.cpu_heap == "keep" else None))
            malloc_env = res.pop("malloc_env", None)
            for m in spec["methods"]:
                r = dict(res.get(m, {"status": "timing: " + res.get("status", "no result")}))
                status = r.pop("status", "ok")
                case_rows[m].update(r)
                if malloc_env is not None:
                    case_rows[m]["timing_malloc_env"] = malloc_env
                if status != "ok" and case_rows[m]["status"] == "ok":
                    case_rows[m]["status"] = status
        progress.clear()  # a live line leaves the terminal to the rows printed below
        for row in case_rows.values():
            rows.append(row)
            print(f"  {case.shape} {row['method']}: fwd {_fmt_ms(row.get('fwd_ms'))} ms, fwd+bwd "
                  f"{_fmt_ms(row.get('fwd_bwd_ms'))} ms, peak "
                  f"{_fmt_mb(row.get('peak_fwd_bwd_bytes') or row.get('peak_fwd_bytes'))} MB "
                  f"[{row['status']}]", flush=True)
        progress.update(done + 1, f"{case.shape} done")
    progress.close()

    table = format_table(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        heap_note = ""
    elif args.cpu_heap == "keep":
        heap_note = ("; CPU timing processes keep glibc's heap ("
                     + " ".join(f"{k}={v}" for k, v in KEEP_HEAP_ENV.items()) + ")")
    else:
        heap_note = "; CPU timing processes with glibc's heap as configured in the environment"
    header = (f"mode `{args.mode}`, dtype {dtype}, device {device.type}, {stamp}\n\n"
              f"Machine: {machine}\n\nTimes are medians over rounds that call every method "
              f"once on the same inputs (order rotated each round; each timed call right "
              f"after {args.settle} untimed call(s) of the same method), after {args.warmup} "
              f"warm-up rounds{heap_note}; peak memory is the "
              f"growth over the inputs (CPU: peak RSS of a fresh process per case; CUDA: "
              f"max_memory_allocated). TFLOP/s count 2·N·M·(dk+dv) per batch forward, 3.5x "
              f"that forward+backward.\n")
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"mode": args.mode, "dtype": dtype, "device": device.type, "machine": machine,
                   "time": stamp, "rows": rows}, f, indent=1)
    if not args.no_plots:
        paths = write_plots(rows, args.out, f"{args.mode}, {dtype}, {machine[:60]}")
        print("\nplots: " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
