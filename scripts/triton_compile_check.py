"""Compile the Triton kernels for NVIDIA targets without a GPU, and report their resources.

The interpreter (how CI runs the kernels) never lowers them to the GPU, so an error that only the
compiler sees (a non-constexpr global, a layout or shape the backend rejects) and register spills
would otherwise wait for the rare GPU machine. This compiles each kernel exactly as a launch on
contiguous inputs of the given shape would (the same block sizes, constexprs and argument
specialisations: unit strides as constants, 16-divisible integers and aligned pointers marked),
for a target such as sm_90, and reads registers and spills (ptxas -v on its PTX) and shared memory.

    python scripts/triton_compile_check.py [--arch 80,90] [--all-configs | --every-config]
           [--dtype float16,float32] [--dims 64x64,256x256,1024x512,24x40]

``--every-config``: every configuration the launcher can choose, for float16, bfloat16 and
float32: each kernel's candidates in each width class, at head dims that reach every class and
the chunked path (EVERY_CONFIG_DIMS). Each row also gives the occupancy on sm_90 that the
registers, warps and shared memory allow (:func:`occupancy`); scripts/gpu_resources.py writes
this table into docs/triton.md.

Needs TRITON_INTERPRET unset (it is cleared here before triton is imported). Exit status 1 when
any kernel fails to compile.
"""

import argparse
import os
import re
import shutil
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
# Head dims whose tiles reach every width class (64, 128, 256), the chunked path (NUM_K or
# NUM_V > 1) and ragged head dims (masked columns), for 16-bit and float32 caps alike.
EVERY_CONFIG_DIMS = ((64, 64), (128, 128), (256, 256), (1024, 512), (24, 40))
HEADER = ("| arch | dtype | dk x dv | kernel | BLOCK_M, BLOCK_N, warps, stages | regs | "
          "spill stores / loads (bytes) | smem bytes | occupancy |\n"
          "|---|---|---|---|---|---|---|---|---|")

# sm_90 (H100/H200) per-SM limits, from the CUDA occupancy calculator's table.
SM90 = dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=233472, smem_per_block=1024)


def occupancy(regs: int, threads: int, smem: int, sm: dict = SM90) -> float:
    """Resident warps per SM / the most an SM holds, for blocks of ``threads`` threads using
    ``regs`` registers per thread and ``smem`` bytes of shared memory: the least of the block
    counts that registers (allocated per warp in units of 256), shared memory (plus 1 KB
    reserved per block), warps and the block limit allow."""
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // sm["reg_unit"]) * sm["reg_unit"]
    limits = [sm["blocks"], sm["warps"] // warps,
              sm["regs"] // (per_warp * warps) if per_warp else sm["blocks"]]
    if smem:
        limits.append(sm["smem"] // (smem + sm["smem_per_block"]))
    return min(limits) * warps / sm["warps"]
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
    res.update(_resources(compiled.asm["ptx"]))
    return res


def _resources(ptx: str) -> dict:
    """Registers and spill stores / loads of the kernel: ptxas -v on the PTX Triton compiled,
    for the PTX's own target (sm_90a for sm_90). The first ptxas that takes the PTX's version:
    Triton's own (Triton 3.9's bin/ptxas is too old for the PTX it writes; it compiles with
    ptxas-blackwell), then CUDA's."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = [os.path.join(bin_dir, "ptxas"), os.path.join(bin_dir, "ptxas-blackwell"),
             shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    if target is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for tool in tools:
            if not tool or not os.path.exists(tool):
                continue
            res = subprocess.run([tool, "-v", f"--gpu-name={target.group(1)}", "-o", os.devnull,
                                  f.name], capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", res.stderr)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
            if res.returncode == 0 and regs and spill:
                return {"regs": int(regs.group(1)),
                        "spill": f"{spill.group(1)} / {spill.group(2)}"}
    return {}


SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _rows(arch: int, dtype: torch.dtype, dims: tuple, all_configs: bool):
    """(markdown row, failed) for each kernel and configuration at these head dims."""
    dk, dv = dims
    for kernel in ("fwd", "pre", "kv", "q"):
        if kernel == "pre":
            configs = [None]
        else:
            bk, bv, _, _ = L.blocks(kernel, dk, dv, dtype)
            cands = L.candidates(kernel, dtype, max(bk, bv))
            configs = cands if all_configs else cands[:1]
        for cfg in configs:
            try:
                r = compile_one(kernel, dtype, (dk, dv), cfg, arch)
                warps = (cfg or L.PRE_CONFIG)[2] if cfg else L.PRE_CONFIG[1]
                occ = (f"{occupancy(r['regs'], 32 * warps, r['smem']):.0%}"
                       if "regs" in r else "?")
                over = " (over the limit)" if r["smem"] > SMEM_LIMIT.get(arch, 1 << 30) else ""
                yield (f"| sm_{arch} | {r['dtype']} | {r['dims']} | {kernel} | "
                       f"{cfg or L.PRE_CONFIG} | {r.get('regs', '?')} | {r.get('spill', '?')} | "
                       f"{r['smem']}{over} | {occ} |"), False
            except Exception as exc:  # report every failure, keep going
                msg = " ".join(str(exc).split())[-300:]
                yield (f"| sm_{arch} | {_TY[dtype]} | {dk}x{dv} | {kernel} | {cfg} | FAILED: "
                       f"{type(exc).__name__}: {msg} | | | |"), True


def every_config_rows(arch: int, dtypes) -> list:
    """The --every-config table's rows (each distinct configuration once)."""
    seen, rows = set(), []
    for dtype in dtypes:
        for dims in EVERY_CONFIG_DIMS:
            for row, _ in _rows(arch, dtype, dims, True):
                if row not in seen:
                    seen.add(row)
                    rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,90")
    ap.add_argument("--dtype", default="float16,float32")
    ap.add_argument("--dims", default="64x64,256x256,1024x512,24x40",
                    help="comma-separated dk x dv")
    ap.add_argument("--all-configs", action="store_true",
                    help="every autotuning candidate (default: the first of each list)")
    ap.add_argument("--every-config", action="store_true",
                    help="every configuration the launcher can choose, for float16, bfloat16 "
                         "and float32 (overrides --dtype and --dims)")
    args = ap.parse_args(argv)
    if args.every_config:
        args.dtype, args.all_configs = "float16,bfloat16,float32", True
        args.dims = ",".join(f"{dk}x{dv}" for dk, dv in EVERY_CONFIG_DIMS)
    failures = 0
    print(HEADER)
    for arch in (int(a) for a in args.arch.split(",")):
        for dname in args.dtype.split(","):
            for d in args.dims.split(","):
                dims = tuple(int(x) for x in d.split("x"))
                for row, failed in _rows(arch, getattr(torch, dname), dims, args.all_configs):
                    failures += failed
                    print(row, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
