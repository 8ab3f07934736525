"""python -m benchmarks.blocks: whole Non-local blocks, the peers' own against the same blocks
converted (nonlocal_kernels.convert) and, where the keys match, this library's NonLocal3d with the
same weights: forward and forward+backward time and peak memory, side by side.

    python -m benchmarks.blocks                      # every case below
    python -m benchmarks.blocks --cases i3d_res3_mmcv,timm_stage1 --repeats 5

Time and memory are measured as by ``python -m benchmarks`` (benchmarks/runner.py): peak memory
in a fresh process per (case, method, step), times in one process, methods called in rounds
(order rotated) after warm-up rounds. Writes results.md and results.json into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from typing import Callable

import torch
from torch import nn

from .cli import _fmt_mb, _fmt_ms, machine_description
from .runner import measure_in_subprocess


def _mmcv(channels, **kw):
    from mmcv.cnn.bricks.non_local import NonLocal3d
    return NonLocal3d(channels, **kw)


def _pytorchvideo(channels, **kw):
    from pytorchvideo.layers.nonlocal_net import create_nonlocal
    return create_nonlocal(dim_in=channels, **kw)


def _timm(channels, **kw):
    from timm.layers.non_local_attn import NonLocalAttn
    return NonLocalAttn(channels, **kw)


# mmaction2's I3D-NL / TSM-NL block configuration.
_MMACTION_NL = dict(sub_sample=True, use_scale=False, mode="embedded_gaussian",
                    norm_cfg=dict(type="BN3d", requires_grad=True))


@dataclasses.dataclass(frozen=True)
class BlockCase:
    label: str
    make: Callable[[], nn.Module]  # the peer's block
    shape: tuple  # the input x
    ours: dict = None  # NonLocal3d arguments with the same state-dict keys, if any


CASES = {
    "i3d_res3_mmcv": BlockCase("I3D-NL res3, mmcv NonLocal3d(512)",
                               lambda: _mmcv(512, **_MMACTION_NL), (1, 512, 4, 28, 28),
                               ours=dict(_MMACTION_NL)),
    "i3d_res4_mmcv": BlockCase("I3D-NL res4, mmcv NonLocal3d(1024)",
                               lambda: _mmcv(1024, **_MMACTION_NL), (1, 1024, 4, 14, 14),
                               ours=dict(_MMACTION_NL)),
    "tsm_res3_mmcv": BlockCase("TSM-NL res3 (8 segments), mmcv NonLocal3d(512)",
                               lambda: _mmcv(512, **_MMACTION_NL), (1, 512, 8, 28, 28),
                               ours=dict(_MMACTION_NL)),
    "i3d_res3_pytorchvideo": BlockCase(
        "I3D res3, pytorchvideo create_nonlocal(512, 256, pool 1x2x2)",
        lambda: _pytorchvideo(512, dim_inner=256, pool_size=(1, 2, 2)), (1, 512, 4, 28, 28)),
    "timm_stage1": BlockCase("timm ResNet-50 stage 1, NonLocalAttn(256) at 56x56",
                             lambda: _timm(256), (1, 256, 56, 56)),
    "timm_stage2": BlockCase("timm ResNet-50 stage 2, NonLocalAttn(512) at 28x28",
                             lambda: _timm(512), (1, 512, 28, 28)),
    "long_video_mmcv": BlockCase("long video 8x56x56, mmcv NonLocal3d(256)",
                                 lambda: _mmcv(256, **_MMACTION_NL), (1, 256, 8, 56, 56),
                                 ours=dict(_MMACTION_NL)),
}
METHODS = ("original", "converted", "ours")


def build(case: BlockCase, method: str) -> nn.Module:
    """The case's block as ``method`` runs it, with the same weights for every method: the peer
    block (seeded; its zero-initialised output layer given random weights, so the attention
    counts), converted, or this library's NonLocal3d loaded with its state dict."""
    import nonlocal_kernels as nk

    torch.manual_seed(0)
    block = case.make()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_(0, 0.1)
    if method == "original":
        return block
    if method == "converted":
        return nk.convert(nn.Sequential(block))
    if method == "ours":
        if case.ours is None:
            raise ValueError(f"method 'ours': case {case.label!r} has no NonLocal3d with the "
                             f"same keys")
        ours = nk.NonLocal3d(case.shape[1], **case.ours)
        ours.load_state_dict(block.state_dict())
        return ours
    raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


class BlockProblem:
    """benchmarks.runner's problem for a block spec: "block" (a CASES key), device, dtype."""

    def __init__(self, spec: dict):
        self.case = CASES[spec["block"]]
        self.device = torch.device(spec["device"])
        self.dtype = getattr(torch, spec["dtype"])

    def method(self, name: str) -> nn.Module:
        return build(self.case, name).to(self.device, self.dtype).train()

    def prime(self, block) -> None:
        small = (1, self.case.shape[1]) + tuple(min(s, 4) for s in self.case.shape[2:])
        block(torch.randn(small, device=self.device, dtype=self.dtype)).sum().backward()

    def allocate(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(self.case.shape, generator=g).to(self.device, self.dtype)
        self.leaf = self.x.detach().requires_grad_()
        self.dy = torch.randn(self.case.shape, generator=g).to(self.device, self.dtype)

    def step(self, block, step: str):
        if step == "fwd":
            def fwd():
                with torch.no_grad():
                    return block(self.x)
            return fwd

        def fwd_bwd():
            self.leaf.grad = None
            block.zero_grad(set_to_none=True)
            block(self.leaf).backward(self.dy)
        return fwd_bwd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blocks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated names of CASES")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--mem-limit-gb", type=float, default=16.0)
    p.add_argument("--out", default="benchmarks/out/blocks")
    args = p.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected names from {', '.join(CASES)}")
    device = torch.device("cpu")
    machine = machine_description(device)
    print(f"# Non-local blocks, {args.dtype}, {machine}\n", flush=True)
    rows = []
    for i, name in enumerate(names):
        case = CASES[name]
        methods = [m for m in METHODS if m != "ours" or case.ours is not None]
        common = {"block": name, "dtype": args.dtype, "device": str(device)}
        print(f"[{i + 1}/{len(names)}] {case.label}, x {case.shape}", flush=True)
        case_rows = {m: {"case": name, "label": case.label, "method": m, "status": "ok"}
                     for m in methods}
        for m in methods:
            for step in ("fwd", "fwd_bwd"):
                res = measure_in_subprocess(dict(common, method=m, steps=[step]), args.timeout,
                                            args.mem_limit_gb)
                status = res.pop("status")
                case_rows[m].update(res)
                if status != "ok":
                    case_rows[m]["status"] = f"{step}: {status}"
        steps = {s: [m for m in methods if not case_rows[m]["status"].startswith(f"{s}:")]
                 for s in ("fwd", "fwd_bwd")}
        res = measure_in_subprocess(dict(common, methods=methods, steps=steps,
                                         repeats=args.repeats, warmup=args.warmup,
                                         budget_s=args.budget),
                                    args.timeout * len(methods), args.mem_limit_gb)
        for m in methods:
            r = dict(res.get(m, {"status": "timing: " + res.get("status", "no result")}))
            status = r.pop("status", "ok")
            case_rows[m].update(r)
            if status != "ok" and case_rows[m]["status"] == "ok":
                case_rows[m]["status"] = status
            row = case_rows[m]
            print(f"  {m}: fwd {_fmt_ms(row.get('fwd_ms'))} ms, fwd+bwd "
                  f"{_fmt_ms(row.get('fwd_bwd_ms'))} ms, peak "
                  f"{_fmt_mb(row.get('peak_fwd_bwd_bytes'))} MB [{row['status']}]", flush=True)
        rows += case_rows.values()

    head = ("| block | x | method | fwd ms | fwd peak MB | fwd+bwd ms | fwd+bwd peak MB | "
            "fwd+bwd time vs original | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["case"]: r.get("fwd_bwd_ms") for r in rows if r["method"] == "original"}
    for r in rows:
        b, t = base.get(r["case"]), r.get("fwd_bwd_ms")
        lines.append(f"| {r['label']} | {CASES[r['case']].shape} | {r['method']} | "
                     f"{_fmt_ms(r.get('fwd_ms'))} | {_fmt_mb(r.get('peak_fwd_bytes'))} | "
                     f"{_fmt_ms(t)} | {_fmt_mb(r.get('peak_fwd_bwd_bytes'))} | "
                     f"{f'{b / t:.2f}x' if b and t else ''} | {r['status']} |")
    table = "\n".join(lines)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Non-local blocks, {args.dtype}, CPU, {stamp}\n\nMachine: {machine}\n\n"
                f"Medians of {args.repeats} rounds after {args.warmup} warm-up rounds, the "
                f"methods of a case called in turn on the same input; peak memory is the RSS "
                f"growth of a fresh process per method and step.\n\n{table}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"dtype": args.dtype, "machine": machine, "time": stamp, "rows": rows}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
