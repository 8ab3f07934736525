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

# Decided once, at import (the extension registers its kernels when it loads): torch.compile
# traces backend selection, and the dispatcher queries behind the reason are not traceable.
_UNAVAILABLE = ops.extension_unavailable_reason() or ops.kernel_unavailable_reason("CPU")
_Function = None if _UNAVAILABLE else ops.make_softmax_function(
    torch.ops.nonlocal_kernels.softmax_fwd, torch.ops.nonlocal_kernels.softmax_bwd,
    "NonlocalSoftmaxCPU")


def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    y, lse = _Function.apply(theta, phi, g, float(scale))
    return (y, lse) if return_lse else y


BACKEND = register(Backend(
    name="cpu",
    description="fused tiled C++ kernel (online softmax, backward recomputes P from lse), "
                "at::parallel_for over batch x query tiles",
    modes=SOFTMAX_MODES,
    dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
    devices=("cpu",),
    run=_run,
    priority=50,
    unavailable_reason=lambda: _UNAVAILABLE,
    how_to_enable=ops.BUILD_HINT,
))
