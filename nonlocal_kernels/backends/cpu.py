"""Backend ``cpu``: the fused, tiled C++ kernel for CPU tensors (csrc/cpu/), softmax family.

Forward streams key tiles through an online softmax per tile of query rows; backward recomputes
P from the saved lse and normalises it by its own row sum (docs/cpu.md). Nothing N x M is ever
allocated; extra memory is O(B * (N + M) * (dk + dv)). Parallel over batch x query tiles, tile
products through BLAS or the packed panel GEMM, fp32 accumulation for float16/bfloat16,
bit-identical results run to run for a given thread count.
"""

from .. import ops
from ..modes import FLOAT_DTYPES
from .registry import register, softmax_backend

BACKEND = register(softmax_backend(
    name="cpu",
    namespace=ops.NAMESPACE,
    dispatch_key="CPU",
    description="fused tiled C++ kernel (online softmax, backward recomputes P from lse), "
                "at::parallel_for over batch x query tiles",
    devices=("cpu",),
    dtypes=FLOAT_DTYPES,
    priority=50,
    how_to_enable=ops.BUILD_HINT,
    not_loaded=ops.extension_unavailable_reason(),
))
