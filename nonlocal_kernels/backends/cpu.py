"""Backend ``cpu``: the fused, tiled C++ kernel for CPU tensors (csrc/cpu/), softmax modes.

Forward streams key tiles through an online softmax per tile of query rows; backward recomputes
P from the saved lse (FlashAttention-2 style). Nothing N x M is ever allocated; extra memory is
O(B * (N + M) * (dk + dv)). Parallel over batch x query tiles with at::parallel_for, tile
products through BLAS (or ATen Vectorized), fp32 accumulation for float16/bfloat16, bit-identical
results run to run for a given thread count.
"""

import torch

from .. import ops
from .registry import SOFTMAX_MODES, Backend, register

_Function = None


def _function():
    global _Function
    if _Function is None:
        _Function = ops.make_softmax_function(torch.ops.nonlocal_kernels.softmax_fwd,
                                              torch.ops.nonlocal_kernels.softmax_bwd,
                                              "NonlocalSoftmaxCPU")
    return _Function


def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    y, lse = _function().apply(theta, phi, g, float(scale))
    return (y, lse) if return_lse else y


def _unavailable_reason():
    return ops.extension_unavailable_reason() or ops.kernel_unavailable_reason("CPU")


BACKEND = register(Backend(
    name="cpu",
    description="fused tiled C++ kernel (online softmax, backward recomputes P from lse), "
                "at::parallel_for over batch x query tiles",
    modes=SOFTMAX_MODES,
    dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
    devices=("cpu",),
    run=_run,
    priority=50,
    unavailable_reason=_unavailable_reason,
    how_to_enable=ops.BUILD_HINT,
))
