"""Backend ``cuda``: the CUDA C++ kernels of the compiled extension (csrc/cuda/), softmax family.

Forward streams key tiles through an online softmax per tile of 64 query rows (y and lse).
Backward (deterministic, no atomics): D = rowsum(dy * y); a stats pass recomputes each row's
max and sum from the scores (more accurate than P = exp(S - lse) for peaked rows); one kernel
owns key tiles for dg / dphi, one owns query tiles for dtheta (docs/cuda.md). Tensor cores through
nvcuda::wmma for float16 / bfloat16 and, when ``torch.backends.cuda.matmul.allow_tf32`` is set,
float32 (TF32); otherwise float32 runs an exact fp32 path. fp32 accumulation, any strides, any
N, M, dk, dv.
"""

import torch

from .. import ops
from .registry import register, softmax_backend

BACKEND = register(softmax_backend(
    name="cuda",
    namespace=ops.NAMESPACE,
    dispatch_key="CUDA",
    description="CUDA C++ kernels (wmma tensor cores, online softmax; backward recomputes the "
                "row statistics, deterministic)",
    devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    priority=90,
    how_to_enable=("Build on a machine with nvcc and a CUDA build of torch: `make setup`, or "
                   "`NONLOCAL_KERNELS_CUDA=1 pip install --no-build-isolation -e .`; it needs a "
                   "CUDA GPU to run."),
    not_loaded=ops.extension_unavailable_reason() or ops.kernel_unavailable_reason("CUDA")
    or (None if torch.cuda.is_available() else "no CUDA device is available"),
))
