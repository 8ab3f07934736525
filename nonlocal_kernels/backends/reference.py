"""Backend ``reference``: the plain-PyTorch oracle (materialises N x M; autograd does backward,
to any order, and torch.func, meta tensors and torch.compile work as for any PyTorch code)."""

from ..modes import FLOAT_DTYPES
from ..reference import nonlocal_reference
from .registry import FAMILIES, Backend, register


def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    return nonlocal_reference(theta, phi, g, mode=mode, scale=scale if scale is not None else 1.0,
                              concat_weight=concat_weight, return_lse=return_lse)


BACKEND = register(Backend(
    name="reference",
    description="plain PyTorch, materialises the N x M affinity; the correctness oracle",
    families=FAMILIES,
    dtypes=FLOAT_DTYPES,
    devices=("cpu", "cuda"),
    run=_run,
    priority=0,
    double_backward=FAMILIES,
))
