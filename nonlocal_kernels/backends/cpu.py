"""Backend ``cpu``: the fused, tiled C++ kernel for CPU tensors (csrc/cpu/), softmax family.

Forward streams key tiles through an online softmax per tile of query rows; backward gets P from
the saved lse and normalises it by its own row sum (docs/cpu.md). Parallel over batch x query
tiles, tile products through BLAS or the packed panel GEMM, fp32 accumulation for
float16/bfloat16, bit-identical results run to run for a given thread count.

Kept scores. When the call will be differentiated and the B·N·M scores S = scale·θφᵀ fit the
budget, the forward keeps them (float32; float64 for float64 inputs) and the backward reads them
instead of recomputing S, one tile product of its five (``nonlocal_kernels::softmax_keep_fwd`` /
``softmax_keep_bwd``). The backward's S is then the very S it would have recomputed, bit for
bit, so the gradients do not change. Above the budget nothing N x M is allocated and extra memory
stays O(B·(N + M)·(dk + dv)). The budget is ``NONLOCAL_KERNELS_CPU_KEEP_MB`` (MiB of scores
per call, read at every call; default :data:`DEFAULT_KEEP_MB`; 0 turns keeping off). Which path
a call took: ``registry.last_path()`` / ``registry.record_paths()`` ("scores kept",
"recomputes S", or "forward only" when nothing will be differentiated).
"""

from __future__ import annotations

import os

import torch

from .. import ops
from ..modes import FLOAT_DTYPES
from .registry import note_path, register, softmax_backend

KEEP_ENV = "NONLOCAL_KERNELS_CPU_KEEP_MB"
# 32 MiB of float32 scores is B·N·M = 8.4 M: a quarter or less of what the naive path holds at
# the same shape (its forward keeps the scores and the softmax, N x M each, in the input dtype,
# and its backward adds dP and dS). It covers N·M up to (3136 x 784) x 3, and the benchmarks'
# long-video shapes (N = 25088, M = 6272: 629 MB of scores) recompute.
DEFAULT_KEEP_MB = 32
PATHS = ("scores kept", "recomputes S", "forward only")


def keep_budget_bytes() -> int:
    """The scores a call may keep, in bytes (``NONLOCAL_KERNELS_CPU_KEEP_MB``)."""
    text = os.environ.get(KEEP_ENV, "")
    if text == "":
        return DEFAULT_KEEP_MB << 20
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"{KEEP_ENV}: expected a number of MiB >= 0 (0: never keep the scores), "
                         f"got {text!r}")
    return int(mb * (1 << 20))


def keeps_scores(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether this call's forward keeps the scores for its backward (and notes the path).
    Never under torch.export: an exported program (and the ONNX export built on it) is for
    inference, where kept scores would only be an N x M tensor in the graph."""
    if torch.compiler.is_exporting() or not (
            torch.is_grad_enabled() and
            (theta.requires_grad or phi.requires_grad or g.requires_grad)):
        note_path("softmax", PATHS[2])
        return False
    B, N, _ = theta.shape
    itemsize = 8 if theta.dtype == torch.float64 else 4
    keep = B * N * phi.shape[1] * itemsize <= keep_budget_bytes()
    note_path("softmax", PATHS[0] if keep else PATHS[1])
    return keep


BACKEND = register(softmax_backend(
    name="cpu",
    namespace=ops.NAMESPACE,
    dispatch_key="CPU",
    description="fused tiled C++ kernel (online softmax; the backward reads the forward's "
                f"scores when they fit {KEEP_ENV}, else recomputes them), at::parallel_for over "
                "batch x query tiles",
    devices=("cpu",),
    dtypes=FLOAT_DTYPES,
    priority=50,
    how_to_enable=ops.BUILD_HINT,
    not_loaded=ops.extension_unavailable_reason(),
    keep=keeps_scores,
))
