"""Backend ``cpu``: the C++ kernel for CPU tensors (csrc/cpu/), softmax family.

Tiled path (above the budget below): the forward streams key tiles through an online softmax per tile of query rows; backward gets P from
the saved lse and normalises it by its own row sum (docs/cpu.md). Parallel over batch x query
tiles, tile products through BLAS or the packed panel GEMM, fp32 accumulation for
float16/bfloat16, bit-identical results run to run for a given thread count.

Whole-batch path. When a call's B·N·M scores fit the budget, the kernel runs the op pair
``nonlocal_kernels::softmax_keep_fwd`` / ``softmax_keep_bwd`` instead: batched BLAS products over
the whole batch with the softmax done in place on one (B, N, M) buffer, and, when the call will
be differentiated, that buffer (the softmax P, float32; float64 for float64 inputs) kept for the
backward, which then recomputes nothing. Above the budget the tiled kernel runs: nothing N x M is
allocated and extra memory stays O(B·(N + M)·(dk + dv)). The budget is
``NONLOCAL_KERNELS_CPU_KEEP_MB`` (MiB of scores per call, read at every call; default
:data:`DEFAULT_KEEP_MB`; 0: always tiled). Which path a call took: ``registry.last_path()`` /
``registry.record_paths()`` (:data:`PATHS`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import ops
from ..modes import FLOAT_DTYPES
from .registry import note_path, register, softmax_backend

KEEP_ENV = "NONLOCAL_KERNELS_CPU_KEEP_MB"
# 32 MiB of float32 scores is B·N·M = 8.4 M. The whole-batch path holds P (forward to backward)
# and dS (backward), two B·N·M buffers; the naive path at the same shape holds at least as many
# in the input dtype (its forward keeps the scores and the softmax, its backward adds dP and dS). It covers N·M up to (3136 x 784) x 3, and the benchmarks'
# long-video shapes (N = 25088, M = 6272: 629 MB of scores) recompute.
DEFAULT_KEEP_MB = 32
# "scores kept": whole batch, P kept for the backward; "recomputes S": tiled forward, and a
# backward that recomputes S; "forward, whole batch" / "forward, tiled": a call that will not be
# differentiated, within / above the budget.
PATHS = ("scores kept", "recomputes S", "forward, whole batch", "forward, tiled")


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


def keeps_scores(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> Optional[bool]:
    """How this call runs (and notes the path): True, the whole-batch pair keeping P for the
    backward; False, the whole-batch forward of a call that will not be differentiated; None, the
    tiled pair (above the budget). Always None under torch.export: an exported program (and the
    ONNX export built on it) holds the family's ops only."""
    if torch.compiler.is_exporting():
        note_path("softmax", PATHS[3])
        return None
    grad = torch.is_grad_enabled() and (theta.requires_grad or phi.requires_grad or
                                        g.requires_grad)
    B, N, _ = theta.shape
    itemsize = 8 if theta.dtype == torch.float64 else 4
    whole = B * N * phi.shape[1] * itemsize <= keep_budget_bytes()
    note_path("softmax", PATHS[(0 if whole else 1) if grad else (2 if whole else 3)])
    return (True if grad else False) if whole else None


BACKEND = register(softmax_backend(
    name="cpu",
    namespace=ops.NAMESPACE,
    dispatch_key="CPU",
    description=f"C++ kernel: within {KEEP_ENV}, batched BLAS products with an in-place "
                "softmax whose P the backward reads; above it, fused tiles with an online "
                "softmax and a backward that recomputes S (linear memory)",
    devices=("cpu",),
    dtypes=FLOAT_DTYPES,
    priority=50,
    how_to_enable=ops.BUILD_HINT,
    not_loaded=ops.extension_unavailable_reason(),
    keep=keeps_scores,
))
