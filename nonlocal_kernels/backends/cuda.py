"""Backend ``cuda``: the CUDA C++ kernels of the compiled extension (csrc/cuda/), softmax modes.

Tiled as DESIGN.md section 4: forward streams key tiles through an online softmax per tile of 64
query rows (y and lse); backward recomputes P from lse (D = rowsum(dy * y); one kernel owns key
tiles for dg / dphi, one owns query tiles for dtheta: deterministic, no atomics). Tensor cores
through nvcuda::wmma for float16 / bfloat16 and, when ``torch.backends.cuda.matmul.allow_tf32``
is set, float32 (TF32); otherwise float32 runs an exact fp32 path. fp32 accumulation, any strides,
any N, M, dk, dv (outputs wider than 128 columns, 64 for float32, are split over blocks that each
recompute the scores).
"""

import torch

from .. import ops
from .registry import SOFTMAX_MODES, Backend, register


def _unavailable():
    reason = ops.extension_unavailable_reason() or ops.kernel_unavailable_reason("CUDA")
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# Decided once, at import (torch.compile traces backend selection).
_UNAVAILABLE = _unavailable()
_Function = None if ops.kernel_unavailable_reason("CUDA") or ops.extension_unavailable_reason() \
    else ops.make_softmax_function(torch.ops.nonlocal_kernels.softmax_fwd,
                                   torch.ops.nonlocal_kernels.softmax_bwd, "NonlocalSoftmaxCUDA")


def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    y, lse = _Function.apply(theta, phi, g, float(scale if scale is not None else 1.0))
    return (y, lse) if return_lse else y


BACKEND = register(Backend(
    name="cuda",
    description="CUDA C++ kernels (wmma tensor cores, online softmax; backward recomputes P "
                "from lse, deterministic)",
    modes=SOFTMAX_MODES,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    devices=("cuda",),
    run=_run,
    priority=90,
    unavailable_reason=lambda: _UNAVAILABLE,
    how_to_enable=("Build on a machine with nvcc and a CUDA build of torch: `make setup`, or "
                   "`NONLOCAL_KERNELS_CUDA=1 pip install --no-build-isolation -e .`; it needs a "
                   "CUDA GPU to run."),
))
