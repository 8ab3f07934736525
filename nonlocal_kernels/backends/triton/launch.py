"""Launchers for the Triton kernels and their torch.library ops.

Ops (namespace ``nonlocal_kernels_triton``, the schemas of csrc/ops.cpp):

    softmax_fwd(Tensor theta, Tensor phi, Tensor g, float scale) -> (Tensor y, Tensor lse)
    softmax_bwd(Tensor dy, Tensor theta, Tensor phi, Tensor g, Tensor y, Tensor lse,
                float scale) -> (Tensor dtheta, Tensor dphi, Tensor dg)

They are ``torch.library.triton_op``s, so ``torch.compile(fullgraph=True)`` traces into the
kernels; their vmap rules and autograd are ops.register_softmax_ops's, and the backend runs them
through ops.SoftmaxAttention.

Block sizes. Each kernel has head-dim caps (BLOCK_K for dk, BLOCK_V for dv): a head dim up to
its cap is one tile held by one program; a larger one is chunked. The forward splits dv past its
cap across programs (each recomputing S = theta phi^T); the backward either accumulates chunks
in float32 workspaces ("accumulate", default) or splits its outputs across programs
("recompute"); see docs/triton.md. BLOCK_M / BLOCK_N / num_warps / num_stages are autotuned on
the GPU, keyed by (dk, dv, dtype, IEEE, BLOCK_K, BLOCK_V); under TRITON_INTERPRET=1 one small
fixed configuration runs.

Knobs (read at call time, for experiments and tests):
  NONLOCAL_KERNELS_TRITON_AUTOTUNE=0       use the first (default) configuration, no tuning
  NONLOCAL_KERNELS_TRITON_CONFIG=i         use candidate i of each kernel's list, no tuning
  NONLOCAL_KERNELS_TRITON_BWD=accumulate|recompute   backward strategy for head dims past one
                                           tile (default BWD_STRATEGY = accumulate)
  NONLOCAL_KERNELS_TRITON_CAPS=fwd=128x256,kv=256x256,q=256x256   head-dim caps (k x v) per
                                           kernel, for every dtype (default: GPU_CAPS)
"""

import contextlib
import os

import torch
import triton

from ... import ops as _ops
from . import NAMESPACE
from . import kernels as K


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()  # @triton.jit decided this at import time too

# Head-dim caps (BLOCK_K cap, BLOCK_V cap) per kernel on the GPU, for 16-bit and float32
# inputs; see the module docstring. Under the interpreter small caps make the tests exercise
# the chunked and split paths on tiny shapes.
GPU_CAPS = {
    "16bit": {"fwd": (128, 256), "kv": (256, 256), "q": (256, 256)},
    # float32 tiles take twice the registers, and exact (IEEE) float32 dot products run on FMA
    # units, whose operands live in registers: smaller chunks keep them from spilling.
    "float32": {"fwd": (64, 128), "kv": (32, 32), "q": (32, 32)},
}
INTERPRET_CAPS = {"fwd": (32, 32), "kv": (32, 32), "q": (32, 32)}
INTERPRET_BLOCK = 16  # BLOCK_M = BLOCK_N under the interpreter

# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and width class
# W = max(BLOCK_K, BLOCK_V) in {64 (and below), 128, 256}. The first one is the default (no
# autotuning). Checked for register spills on sm_90 with
# `python scripts/triton_compile_check.py --all-configs` (docs/triton.md).
GPU_CONFIGS = {
    "16bit": {
        "fwd": {
            64: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)],
            128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
            256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        },
        "kv": {
            64: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 3)],
            128: [(64, 64, 8, 2), (16, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 2)],
            256: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2)],
        },
        # BLOCK_N >= 64 only: on an H200 with Triton 3.6 every q candidate with BLOCK_N = 32
        # gave a wrong dtheta (up to 500x the tolerance) or an illegal memory access when g
        # and dy are row-major with an odd width (the lse-gradient column) and phi is
        # column-major or strided; every BLOCK_N = 64 candidate was right on the same inputs
        # (benchmarks/results/gpu-h200-2026-11-30.md).
        "q": {
            64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3)],
            128: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
            256: [(32, 64, 8, 2), (64, 64, 8, 1), (32, 64, 8, 1), (16, 64, 4, 2)],
        },
    },
    "float32": {  # the same list for every width class (the caps keep W <= 128)
        "fwd": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
        "kv": [(16, 32, 4, 2), (32, 32, 4, 2)],
        "q": [(32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2), (64, 32, 4, 2)],
    },
}
PRE_CONFIG = (64, 8)  # preprocess: BLOCK_M, num_warps (4 warps spilled 176 bytes at dv = 40, Triton 3.6)
PRE_BLOCK_V = 64

_JIT = {"fwd": K.softmax_fwd_kernel, "kv": K.softmax_bwd_kv_kernel, "q": K.softmax_bwd_q_kernel,
        "pre": K.softmax_bwd_pre_kernel}
# Triton adds the dtypes of the tensor arguments; BLOCK_K / BLOCK_V follow from (dk, dv, dtype)
# and the caps, and are in the key so that changing the caps never reuses a stale choice.
_TUNE_KEY = ["DK", "DV", "IEEE", "BLOCK_K", "BLOCK_V"]
# Problems smaller than this (B * N * M) run the default configuration without tuning, so a
# warm-up on a tiny input never decides the configuration of the real one.
TUNE_MIN_WORK = 1 << 22
_AUTOTUNERS: dict = {}


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def caps(kernel: str, dtype: torch.dtype) -> tuple:
    """(BLOCK_K cap, BLOCK_V cap) for a kernel ("fwd", "kv", "q")."""
    if INTERPRET:
        return INTERPRET_CAPS[kernel]
    table = dict(GPU_CAPS[_size_class(dtype)])
    spec = os.environ.get("NONLOCAL_KERNELS_TRITON_CAPS", "").strip()
    if spec:  # e.g. "fwd=128x256,kv=128x128": applies to every dtype
        for item in spec.split(","):
            name, _, kv = item.partition("=")
            kc, _, vc = kv.partition("x")
            table[name.strip()] = (max(16, _pow2(int(kc))), max(16, _pow2(int(vc))))
    return table[kernel]


def _size_class(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "16bit"


def width_class(width: int) -> int:
    return 64 if width <= 64 else (128 if width <= 128 else 256)


def candidates(kernel: str, dtype: torch.dtype, width: int) -> list:
    """Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), default first."""
    table = GPU_CONFIGS[_size_class(dtype)][kernel]
    return table[width_class(width)] if isinstance(table, dict) else table


def blocks(kernel: str, dk: int, dv: int, dtype: torch.dtype) -> tuple:
    """BLOCK_K, BLOCK_V, NUM_K, NUM_V for a kernel and head dims."""
    kc, vc = caps(kernel, dtype)
    bk = min(max(16, _pow2(dk)), kc)
    bv = min(max(16, _pow2(dv)), vc)
    return bk, bv, triton.cdiv(dk, bk), triton.cdiv(dv, bv)


# How the backward handles head dims past one tile (see kernels.py): "accumulate" computes
# S, P, dP, dS once per tile pair and accumulates the dphi / dg / dtheta chunks in float32
# workspaces (O((N + M) d) memory, read-modify-write traffic); "recompute" splits the output
# columns across programs, each recomputing S (and dP) for its part.
BWD_STRATEGY = "accumulate"


def bwd_strategy() -> str:
    value = os.environ.get("NONLOCAL_KERNELS_TRITON_BWD", "").strip() or BWD_STRATEGY
    if value not in ("accumulate", "recompute"):
        raise ValueError(f"NONLOCAL_KERNELS_TRITON_BWD: expected 'accumulate' or 'recompute', "
                         f"got {value!r}")
    return value


def _autotune_enabled() -> bool:
    return os.environ.get("NONLOCAL_KERNELS_TRITON_AUTOTUNE", "1") not in ("", "0")


def _kernel(kernel: str, dtype: torch.dtype, width: int, work: int):
    """(launchable kernel, extra kwargs). Interpreter: the jit function with fixed blocks.
    GPU: a triton.autotune over the candidates of the width class (a single config, so no
    benchmarking, when autotuning is off or the problem has fewer than TUNE_MIN_WORK
    B*N*M entries)."""
    if INTERPRET:
        if kernel == "pre":
            return _JIT[kernel], {"BLOCK_M": INTERPRET_BLOCK}
        return _JIT[kernel], {"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}
    forced = os.environ.get("NONLOCAL_KERNELS_TRITON_CONFIG", "").strip()
    tune = _autotune_enabled() and work >= TUNE_MIN_WORK
    choice = int(forced) if forced else (None if tune else 0)
    cands = candidates(kernel, dtype, width) if kernel != "pre" else [None]
    if choice is not None:
        cands = [cands[min(choice, len(cands) - 1)]]
    key = (kernel, tuple(cands))
    if key not in _AUTOTUNERS:
        if kernel == "pre":
            bm, nw = PRE_CONFIG
            configs = [triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=1)]
        else:
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                       for bm, bn, nw, ns in cands]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=_TUNE_KEY if kernel != "pre"
                                           else ["DV"])(_JIT[kernel])
    return _AUTOTUNERS[key], {}


def _launcher(kernel, like: torch.Tensor):
    # With meta tensors (models on the meta device; the triton_op's fake) only the outputs'
    # metadata matters: launch nothing. (wrap_triton launches nothing under fake tensors.)
    if like.device.type == "meta":
        return _NoLaunch()
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if os.environ.get("NONLOCAL_KERNELS_POISON", "0") not in ("", "0"):
        out.fill_(float("nan"))
    return out


def _new_output(shape, dtype, device) -> torch.Tensor:
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def _use_ieee(dtype: torch.dtype) -> bool:
    # float32: exact dot products unless the user allowed TF32 for matmuls.
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _softmax_fwd_impl(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, dk = theta.shape
    M, dv = phi.shape[1], g.shape[2]
    y = _new_output((B, N, dv), g.dtype, theta.device)
    lse = _new_output((B, N), torch.float32, theta.device)
    bk, bv, nk, nv = blocks("fwd", dk, dv, theta.dtype)
    kern, extra = _kernel("fwd", theta.dtype, max(bk, bv), B * N * M)

    def grid(meta):
        return (B * triton.cdiv(N, meta["BLOCK_M"]), nv)

    with _device_ctx(theta):
        _launcher(kern, theta)[grid](
            theta, phi, g, y, lse,
            theta.stride(0), theta.stride(1), theta.stride(2),
            phi.stride(0), phi.stride(1), phi.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            y.stride(0), y.stride(1), y.stride(2), lse.stride(0), lse.stride(1),
            N, M, dk, dv, scale * K.LOG2E,
            BLOCK_K=bk, BLOCK_V=bv, NUM_K=nk, IEEE=_use_ieee(theta.dtype), **extra)
    return y, lse


def _softmax_bwd_impl(dy: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor,
                      g: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, dk = theta.shape
    M, dv = phi.shape[1], g.shape[2]
    dev, ieee = theta.device, _use_ieee(theta.dtype)
    # Gradients laid out like their inputs (the op contract; the kernels take any strides).
    dtheta, dphi, dg = (_poisoned(torch.empty_like(t)) for t in (theta, phi, g))
    delta = torch.empty((B, N), dtype=torch.float32, device=dev)

    with _device_ctx(theta):
        # D = rowsum(dy * y)
        pre, extra = _kernel("pre", theta.dtype, 0, 0)
        pre_bv = min(max(16, _pow2(dv)), PRE_BLOCK_V)
        _launcher(pre, theta)[lambda meta: (B * triton.cdiv(N, meta["BLOCK_M"]),)](
            dy, y, delta, dy.stride(0), dy.stride(1), dy.stride(2),
            y.stride(0), y.stride(1), y.stride(2), N, dv, BLOCK_V=pre_bv, **extra)

        common = (theta, phi, g, dy, lse, delta)
        in_strides = (theta.stride(0), theta.stride(1), theta.stride(2),
                      phi.stride(0), phi.stride(1), phi.stride(2),
                      g.stride(0), g.stride(1), g.stride(2),
                      dy.stride(0), dy.stride(1), dy.stride(2), lse.stride(0), lse.stride(1))
        sizes = (N, M, dk, dv, scale * K.LOG2E, scale)

        split = bwd_strategy() == "recompute"
        f32 = dict(dtype=torch.float32, device=dev)

        # dphi, dg: one program per key tile (and per part when splitting)
        bk, bv, nk, nv = blocks("kv", dk, dv, theta.dtype)
        kern, extra = _kernel("kv", theta.dtype, max(bk, bv), B * N * M)
        n_parts = max(nk, nv) if split else 1
        ws_k = torch.zeros((B, M, dk), **f32) if n_parts == 1 and nk > 1 else delta
        ws_v = torch.zeros((B, M, dv), **f32) if n_parts == 1 and nv > 1 else delta
        _launcher(kern, theta)[lambda meta: (B * triton.cdiv(M, meta["BLOCK_N"]), n_parts)](
            *common, dphi, dg, ws_k, ws_v, *in_strides,
            dphi.stride(0), dphi.stride(1), dphi.stride(2), dg.stride(0), dg.stride(1),
            dg.stride(2), *sizes,
            BLOCK_K=bk, BLOCK_V=bv, NUM_K=nk, NUM_V=nv, SPLIT=n_parts > 1, IEEE=ieee, **extra)

        # dtheta: one program per query tile (and per dk part when splitting)
        bk, bv, nk, nv = blocks("q", dk, dv, theta.dtype)
        kern, extra = _kernel("q", theta.dtype, max(bk, bv), B * N * M)
        n_parts = nk if split else 1
        ws_k = torch.zeros((B, N, dk), **f32) if n_parts == 1 and nk > 1 else delta
        _launcher(kern, theta)[lambda meta: (B * triton.cdiv(N, meta["BLOCK_M"]), n_parts)](
            *common, dtheta, ws_k, *in_strides,
            dtheta.stride(0), dtheta.stride(1), dtheta.stride(2), *sizes,
            BLOCK_K=bk, BLOCK_V=bv, NUM_K=nk, NUM_V=nv, SPLIT=n_parts > 1, IEEE=ieee, **extra)
    return dtheta, dphi, dg


def _register_ops():
    # On a GPU, triton_ops: torch.compile traces into the kernels (wrap_triton), and the fake is
    # the implementation itself, run without launching. The interpreter's kernels are plain
    # Python calls that tracing cannot record, so there the ops are opaque custom ops.
    define = torch.library.custom_op if INTERPRET else torch.library.triton_op
    for name, impl in (("softmax_fwd", _softmax_fwd_impl), ("softmax_bwd", _softmax_bwd_impl)):
        define(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_ops.SOFTMAX_SCHEMAS[name])
    _ops.register_softmax_ops(NAMESPACE, fake=INTERPRET)


_register_ops()
