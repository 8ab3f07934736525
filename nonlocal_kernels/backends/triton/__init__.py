"""Backend ``triton``: fused Triton kernels for the softmax family (kernels.py, launch.py).

Runs on CUDA tensors. Under ``TRITON_INTERPRET=1`` (the test suite sets it on machines without
a GPU) it also runs on CPU tensors, but only when named (``backend="triton"``): ``auto`` never
picks the interpreter.
"""

import importlib.util
import os

import torch

from ..registry import SOFTMAX_MODES, Backend, register

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_IMPORT_ERROR = None
_launch = None
if importlib.util.find_spec("triton") is None:
    _IMPORT_ERROR = "the triton package is not installed"
else:
    try:
        from . import launch as _launch  # imports triton, registers the ops
    except Exception as exc:  # a broken triton install must not break `import nonlocal_kernels`
        _IMPORT_ERROR = f"importing the Triton kernels failed ({type(exc).__name__}: {exc})"


def _unavailable_reason():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not _INTERPRET and not torch.cuda.is_available():
        return ("no CUDA GPU is available (Triton kernels need one; CPU tensors run only under "
                "the Triton interpreter, TRITON_INTERPRET=1, for tests)")
    return None


def _run(theta, phi, g, **kw):
    return _launch.run(theta, phi, g, **kw)


BACKEND = register(Backend(
    name="triton",
    description="fused tiled Triton kernels (online softmax forward, FlashAttention-2 style "
                "deterministic backward), any strides, head dims chunked/split",
    modes=SOFTMAX_MODES,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    devices=("cuda", "cpu") if _INTERPRET else ("cuda",),
    run=_run,
    priority=100,
    unavailable_reason=_unavailable_reason,
    how_to_enable="Install triton (`pip install triton`) and run on a CUDA GPU; for tests on CPU "
                  "set TRITON_INTERPRET=1 before importing nonlocal_kernels.",
    # The interpreter is for tests only: auto never picks it (on any device).
    auto=not _INTERPRET,
))
