"""Backend ``cuda_emu`` (tests only): the CUDA kernels of csrc/cuda compiled by the host
compiler against the emulator csrc/emu/cuda_emu.h (``nonlocal_kernels._C_emu``), on CPU tensors.

It checks the kernels' indexing, tiling, barriers, masking and softmax without a GPU: every CUDA
thread is a fiber, barriers and warp collectives are checked (a broken one raises an error naming
file and line), and the order in which threads run is selectable, so a missing barrier shows as a
wrong result under some order::

    with cuda_emu.run_order("random:7"):
        nonlocal_attention(theta, phi, g, backend="cuda_emu")

Slow (tens of ns per thread per barrier, wmma emulated on the CPU): keep shapes small. Never
picked by ``backend="auto"``. Built with ``NONLOCAL_KERNELS_EMU=1`` (``make test`` sets it).
"""

import contextlib

import torch

from .. import ops
from .registry import register, softmax_backend

NAMESPACE = "nonlocal_kernels_emu"

try:
    from .. import _C_emu  # noqa: F401  (registers torch.ops.nonlocal_kernels_emu.*)
    _NOT_LOADED = None
    ops.register_softmax_ops(NAMESPACE)
except ImportError as exc:
    _C_emu = None
    _NOT_LOADED = f"nonlocal_kernels._C_emu is not built or failed to load ({exc})"


def _check_loaded() -> None:
    if _NOT_LOADED is not None:
        raise RuntimeError(f"backend 'cuda_emu' is not available: {_NOT_LOADED}")


def set_run_order(order: str) -> None:
    """Run order of emulated threads and blocks: "forward", "reverse" or "random:SEED"."""
    _check_loaded()
    torch.ops.nonlocal_kernels_emu.set_run_order(order)


def get_run_order() -> str:
    _check_loaded()
    return torch.ops.nonlocal_kernels_emu.get_run_order()


@contextlib.contextmanager
def run_order(order: str):
    """Context manager: run the emulated kernels in `order`, then restore the previous one."""
    previous = get_run_order()
    set_run_order(order)
    try:
        yield
    finally:
        set_run_order(previous)


BACKEND = register(softmax_backend(
    name="cuda_emu",
    namespace=NAMESPACE,
    dispatch_key="CPU",
    description="the CUDA kernels run on CPU tensors by the host emulator (tests only, slow)",
    devices=("cpu",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    priority=0,
    how_to_enable=("Build the test extension: `NONLOCAL_KERNELS_EMU=1 pip install "
                   "--no-build-isolation -e .` (needs CUDA's headers, e.g. /usr/local/cuda)."),
    not_loaded=_NOT_LOADED,
    auto=False,
))
