"""Backends: the registry and one module per backend. Importing this registers them all."""

from . import registry
from . import reference  # noqa: F401  (registers "reference")
from . import cpu  # noqa: F401  (registers "cpu")
from . import fast  # noqa: F401  (registers "fast": exact dot_product / concatenation paths)
from . import cuda  # noqa: F401  (registers "cuda")
from . import cuda_emu  # noqa: F401  (registers "cuda_emu", tests only)
from . import triton  # noqa: F401  (registers "triton")
from . import sdpa  # noqa: F401  (registers "sdpa": PyTorch's fused SDPA kernels)
from .registry import available_backends

__all__ = ["registry", "available_backends"]
