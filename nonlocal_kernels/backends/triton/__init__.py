"""Backend ``triton``: fused Triton kernels for the softmax family (kernels.py, launch.py).

Runs on CUDA tensors. Under ``TRITON_INTERPRET=1`` (the test suite sets it on machines without
a GPU) it also runs on CPU tensors, but only when named (``backend="triton"``): ``auto`` never
picks the interpreter.
"""

import importlib.util
import os

import torch

from ..registry import register, softmax_backend

NAMESPACE = "nonlocal_kernels_triton"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_unusable():
    """Why Triton's interpreter cannot run the kernels here, or None. Before Triton 3.8 (seen
    with 3.6) it turns a loop bound into an index with int() of a 1-element array, which NumPy
    refuses since 2.4 ("only 0-dimensional arrays can be converted to Python scalars"); 3.8
    squeezes the array first."""
    import numpy
    import triton

    try:
        int(numpy.zeros(1))
        return None
    except TypeError:
        pass
    version = tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())
    if version >= (3, 8):
        return None
    return (f"the interpreter of Triton {triton.__version__} cannot run with NumPy "
            f"{numpy.__version__} (it needs int() of 1-element arrays, which NumPy refuses "
            f"since 2.4): for the interpreter tests install 'numpy<2.4' or triton >= 3.8")


def _not_loaded():
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        from . import launch  # noqa: F401  (imports triton, registers the ops)
    except Exception as exc:  # a broken triton install must not break `import nonlocal_kernels`
        return f"importing the Triton kernels failed ({type(exc).__name__}: {exc})"
    if _INTERPRET and not torch.cuda.is_available():
        reason = _interpreter_unusable()
        if reason is not None:
            return reason
    if not _INTERPRET and not torch.cuda.is_available():
        return ("no CUDA GPU is available (Triton kernels need one; CPU tensors run only under "
                "the Triton interpreter, TRITON_INTERPRET=1, for tests)")
    return None


BACKEND = register(softmax_backend(
    name="triton",
    namespace=NAMESPACE,
    dispatch_key="CompositeExplicitAutograd",  # triton_op registers its kernel for every device
    description="fused tiled Triton kernels (online softmax forward, FlashAttention-2 style "
                "deterministic backward), any strides, head dims chunked/split",
    devices=("cuda", "cpu") if _INTERPRET else ("cuda",),
    # The interpreter (numpy) has no bfloat16 dot product: under it bfloat16 is refused.
    dtypes=(torch.float32, torch.float16) if _INTERPRET
    else (torch.float32, torch.float16, torch.bfloat16),
    priority=100,
    how_to_enable="Install triton (`pip install triton`) and run on a CUDA GPU; for tests on CPU "
                  "set TRITON_INTERPRET=1 before importing nonlocal_kernels.",
    not_loaded=_not_loaded(),
    # The interpreter is for tests only: auto never picks it (on any device).
    auto=not _INTERPRET,
))
