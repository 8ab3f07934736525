"""Compile the Triton kernels for NVIDIA targets without a GPU, and report their resources.

The interpreter (how CI runs the kernels) never lowers them to the GPU, so an error that only the
compiler sees (a non-constexpr global, a layout or shape the backend rejects) and register spills
would otherwise wait for the rare GPU machine. This compiles each kernel exactly as a launch on
contiguous inputs of the given shape would (the same block sizes, constexprs and argument
specialisations: unit strides as constants, 16-divisible integers and aligned pointers marked),
for a target such as sm_90, and reads registers, spills and shared memory from the cubin.

    python scripts/triton_compile_check.py [--arch 80,90] [--all-configs]
           [--dtype float16,float32] [--dims 64x64,256x256,1024x512,24x40]

Needs TRITON_INTERPRET unset (it is cleared here before triton is imported). Exit status 1 when
any kernel fails to compile.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
# Run from a checkout: import this checkout's package (scripts/.. on the path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nonlocal_kernels.backends.triton import kernels as K  # noqa: E402
from nonlocal_kernels.backends.triton import launch as L  # noqa: E402

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FP32_PTRS = {"LSE", "Dd", "WK", "WV"}
_FLOAT_ARGS = {"qk_scale", "scale"}


def _contiguous_args(kernel: str, B: int, N: int, M: int, dk: int, dv: int) -> dict:
    """Runtime scalar arguments of a launch on contiguous (B, N, dk) / (B, M, dk) / (B, M, dv)
    inputs: strides and sizes, by argument name."""
    tq = (N * dk, dk, 1)
    tk = (M * dk, dk, 1)
    tg = (M * dv, dv, 1)
    ty = (N * dv, dv, 1)
    tl_ = (N, 1)
    names = {
        "fwd": [("s_tb", "s_tn", "s_tk"), ("s_pb", "s_pm", "s_pk"), ("s_gb", "s_gm", "s_gv"),
                ("s_yb", "s_yn", "s_yv"), ("s_lb", "s_ln")],
        "pre": [("s_db", "s_dn", "s_dv"), ("s_yb", "s_yn", "s_yv")],
        "kv": [("s_tb", "s_tn", "s_tk"), ("s_pb", "s_pm", "s_pk"), ("s_gb", "s_gm", "s_gv"),
               ("s_db", "s_dn", "s_dv"), ("s_lb", "s_ln"), ("s_qb", "s_qm", "s_qk"),
               ("s_eb", "s_em", "s_ev")],
        "q": [("s_tb", "s_tn", "s_tk"), ("s_pb", "s_pm", "s_pk"), ("s_gb", "s_gm", "s_gv"),
              ("s_db", "s_dn", "s_dv"), ("s_lb", "s_ln"), ("s_qb", "s_qn", "s_qk")],
    }[kernel]
    values = {"fwd": [tq, tk, tg, ty, tl_], "pre": [ty, ty],
              "kv": [tq, tk, tg, ty, tl_, tk, tg], "q": [tq, tk, tg, ty, tl_, tq]}[kernel]
    out = {"N": N, "M": M, "DK": dk, "DV": dv}
    for ns, vs in zip(names, values):
        out.update(zip(ns, vs))
    return out


def compile_one(kernel: str, dtype: torch.dtype, dims: tuple, config: tuple, arch: int,
                shape=(2, 1000, 250)) -> dict:
    """Compile one kernel for sm_<arch>; config = (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    dk, dv = dims
    B, N, M = shape
    fn = {"fwd": K.softmax_fwd_kernel, "kv": K.softmax_bwd_kv_kernel,
          "q": K.softmax_bwd_q_kernel, "pre": K.softmax_bwd_pre_kernel}[kernel]
    consts = {}
    if kernel == "pre":
        consts.update(BLOCK_M=L.PRE_CONFIG[0], BLOCK_V=min(max(16, L._pow2(dv)), L.PRE_BLOCK_V))
        nw, ns = L.PRE_CONFIG[1], 1
    else:
        bk, bv, nk, nv = L.blocks(kernel, dk, dv, dtype)
        bm, bn, nw, ns = config
        consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_V=bv, NUM_K=nk,
                      IEEE=dtype == torch.float32)
        if kernel != "fwd":
            consts["NUM_V"] = nv
            parts = max(nk, nv) if kernel == "kv" else nk
            consts["SPLIT"] = L.bwd_strategy() == "recompute" and parts > 1
    ints = _contiguous_args(kernel, B, N, M, dk, dv)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            v = ints[name]
            if v == 1:  # Triton specialises integer arguments equal to 1 as constants
                consts[name] = 1
                sig[name] = "constexpr"
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:  # a tensor: an aligned pointer
            sig[name] = "*fp32" if name in _FP32_PTRS else "*" + _TY[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": nw, "num_stages": ns})
    res = {"kernel": kernel, "dtype": _TY[dtype], "dims": f"{dk}x{dv}", "config": config,
           "arch": arch, "seconds": time.time() - t0, "smem": compiled.metadata.shared}
    res.update(_resources(compiled.asm["cubin"]))
    return res


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,90")
    ap.add_argument("--dtype", default="float16,float32")
    ap.add_argument("--dims", default="64x64,256x256,1024x512,24x40",
                    help="comma-separated dk x dv")
    ap.add_argument("--all-configs", action="store_true",
                    help="every autotuning candidate (default: the first of each list)")
    args = ap.parse_args(argv)
    failures = 0
    print("| arch | dtype | dk x dv | kernel | BLOCK_M, BLOCK_N, warps, stages | regs | "
          "spill bytes | smem bytes | s |\n|---|---|---|---|---|---|---|---|---|")
    smem_limit = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
    for arch in (int(a) for a in args.arch.split(",")):
        for dname in args.dtype.split(","):
            dtype = getattr(torch, dname)
            for d in args.dims.split(","):
                dk, dv = (int(x) for x in d.split("x"))
                for kernel in ("fwd", "pre", "kv", "q"):
                    if kernel == "pre":
                        configs = [None]
                    else:
                        bk, bv, _, _ = L.blocks(kernel, dk, dv, dtype)
                        cands = L.candidates(kernel, dtype, max(bk, bv))
                        configs = cands if args.all_configs else cands[:1]
                    for cfg in configs:
                        try:
                            r = compile_one(kernel, dtype, (dk, dv), cfg, arch)
                            print(f"| sm_{arch} | {r['dtype']} | {r['dims']} | {kernel} | "
                                  f"{cfg or L.PRE_CONFIG} | {r.get('regs', '?')} | "
                                  f"{r.get('stack', '?')} | {r['smem']}"
                                  f"{' (over the limit)' if r['smem'] > smem_limit.get(arch, 1 << 30) else ''} | "
                                  f"{r['seconds']:.1f} |", flush=True)
                        except Exception as exc:  # report every failure, keep going
                            failures += 1
                            msg = " ".join(str(exc).split())[-300:]
                            print(f"| sm_{arch} | {dname} | {d} | {kernel} | {cfg} | FAILED: "
                                  f"{type(exc).__name__}: {msg} | | | |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
