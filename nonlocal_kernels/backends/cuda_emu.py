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
from .registry import SOFTMAX_MODES, Backend, register

NAMESPACE = "nonlocal_kernels_emu"

try:
    from .. import _C_emu  # noqa: F401  (registers torch.ops.nonlocal_kernels_emu.*)
    _UNAVAILABLE = ops.kernel_unavailable_reason("CPU", namespace=NAMESPACE)
except ImportError as exc:
    _C_emu = None
    _UNAVAILABLE = f"nonlocal_kernels._C_emu is not built or failed to load ({exc})"

_Function = None
if _UNAVAILABLE is None:
    ops.register_softmax_fakes(NAMESPACE)
    _Function = ops.make_softmax_function(torch.ops.nonlocal_kernels_emu.softmax_fwd,
                                          torch.ops.nonlocal_kernels_emu.softmax_bwd,
                                          "NonlocalSoftmaxCUDAEmu")


def unavailable_reason():
    return _UNAVAILABLE


def set_run_order(order: str) -> None:
    """Run order of emulated threads and blocks: "forward", "reverse" or "random:SEED"."""
    if _UNAVAILABLE is not None:
        raise RuntimeError(f"backend 'cuda_emu' is not available: {_UNAVAILABLE}")
    torch.ops.nonlocal_kernels_emu.set_run_order(order)


def get_run_order() -> str:
    if _UNAVAILABLE is not None:
        raise RuntimeError(f"backend 'cuda_emu' is not available: {_UNAVAILABLE}")
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


def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    y, lse = _Function.apply(theta, phi, g, float(scale if scale is not None else 1.0))
    return (y, lse) if return_lse else y


BACKEND = register(Backend(
    name="cuda_emu",
    description="the CUDA kernels run on CPU tensors by the host emulator (tests only, slow)",
    modes=SOFTMAX_MODES,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    devices=("cpu",),
    run=_run,
    priority=0,
    unavailable_reason=lambda: _UNAVAILABLE,
    how_to_enable=("Build the test extension: `NONLOCAL_KERNELS_EMU=1 pip install "
                   "--no-build-isolation -e .` (needs CUDA's headers, e.g. /usr/local/cuda)."),
    auto=False,
))
