"""pytest-benchmark suite: `pytest benchmarks/` (forward+backward of every available method on
small CPU shapes; pass --benchmark-only/--benchmark-json as usual). The CLI (python -m
benchmarks) covers the large shapes, memory and plots."""

import pytest
import torch

from benchmarks.baselines import default_methods, get_method
from nonlocal_kernels import modes
from nonlocal_kernels.testing import make_inputs

SHAPES = [(1, 784, 196, 64, 64), (1, 1568, 392, 128, 128)]
MODES = ["embedded_gaussian", "dot_product", "concatenation"]


def _cases():
    for mode in MODES:
        for method in default_methods(mode, "cpu"):
            for shape in SHAPES:
                yield pytest.param(mode, method, shape, id=f"{mode}-{method}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("mode,method,shape", list(_cases()))
def test_fwd_bwd(benchmark, mode, method, shape):
    B, N, M, dk, dv = shape
    m = modes.get(mode)
    theta, phi, g, *w = make_inputs(B, N, M, dk, dv, with_concat=m.takes_concat_weight)
    leaves = [t.detach().requires_grad_() for t in (theta, phi, g)]
    w = w[0].detach().requires_grad_() if w else None
    scale = m.default_scale(dk)
    fn = get_method(method)
    dy = torch.randn(B, N, dv)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves, w, mode, scale).backward(dy)

    benchmark(step)
    assert torch.isfinite(leaves[0].grad).all()
