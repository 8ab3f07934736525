"""nonlocal_kernels: fused, memory-efficient kernels for Non-local Neural Networks."""

from . import ops  # noqa: F401  (loads _C when built, registers fake kernels)
from .backends import available_backends
from .convert import ConvertedNonLocal, convert, converted_blocks
from .functional import nonlocal_attention
from .modules import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock
from .reference import nonlocal_reference

__version__ = "0.1.0"

__all__ = [
    "nonlocal_attention",
    "nonlocal_reference",
    "available_backends",
    "NonLocalBlock",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "convert",
    "converted_blocks",
    "ConvertedNonLocal",
]
