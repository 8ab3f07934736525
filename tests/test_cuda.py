"""Backend ``cuda`` on a GPU (skipped without one; scripts/gpu_check_cuda.sh runs them): the same
oracle checks as the emulated tests (tests/test_cuda_emu.py) on real hardware and larger shapes,
plus what only a GPU shows: TF32 tensor cores, run-to-run determinism, no N x M memory, streams.
"""

import pytest
import torch

from nonlocal_kernels import nonlocal_attention
from nonlocal_kernels.backends import registry
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


def _available():
    reason = registry.get("cuda").unavailable_reason()
    if reason is not None:
        pytest.fail(f"backend 'cuda' is not available on this GPU machine: {reason}")


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


SHAPES = [
    pytest.param((2, 77, 45, 19, 23), "channels_first", id="ragged-small"),
    pytest.param((2, 1000, 333, 64, 64), "channels_first", id="ragged-64"),
    pytest.param((1, 513, 257, 256, 256), "strided", id="d256-strided"),
    pytest.param((1, 300, 200, 1024, 512), "channels_first", id="gaussian-dk1024-dv512"),
    pytest.param((1, 100, 70, 2100, 2049), "contiguous", id="dk2100-dv2049"),
    pytest.param((3, 1, 1, 1, 1), "contiguous", id="N1-M1-d1"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_against_oracle(shape, layout, dtype):
    _available()
    if dtype != torch.float32 and shape[3] == 1:
        pytest.skip("dk = 1 in low precision: the reference's own error is too small a "
                    "yardstick (see tests/test_cuda_emu.py::test_dk1)")
    theta, phi, g = make_inputs(*shape, dtype=dtype, layout=layout, device="cuda")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cuda", scale=shape[3] ** -0.5,
                                      return_lse=True))


@pytest.mark.parametrize("shape", [(2, 1000, 333, 64, 64), (1, 300, 200, 300, 200)])
def test_tf32(shape):
    _available()
    torch.backends.cuda.matmul.allow_tf32 = True
    theta, phi, g = make_inputs(*shape, dtype=torch.float32, device="cuda")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cuda", scale=shape[3] ** -0.5,
                                      return_lse=True, tf32=True))


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_peaked_softmax(scale):
    # Large logits (the Gaussian variant feeds raw features, unscaled): nearly one-hot rows.
    _available()
    theta, phi, g = make_inputs(1, 500, 400, 128, 64, dtype=torch.float32, device="cuda")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="cuda", scale=scale,
                                      return_lse=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic(dtype):
    _available()
    theta, phi, g = make_inputs(2, 700, 900, 96, 80, dtype=dtype, device="cuda")
    dy = torch.randn(2, 700, 80, dtype=dtype, device="cuda")
    runs = []
    for _ in range(3):
        ins = [t.detach().clone().requires_grad_(True) for t in (theta, phi, g)]
        y, lse = nonlocal_attention(*ins, backend="cuda", scale=0.1, return_lse=True)
        y.backward(dy)
        runs.append([y, lse] + [t.grad for t in ins])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_no_quadratic_memory():
    _available()
    N = M = 16384
    theta, phi, g = make_inputs(1, N, M, 64, 64, dtype=torch.float16, device="cuda")
    theta.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = nonlocal_attention(theta, phi, g, backend="cuda")
    y.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * M * 2 / 8, f"{extra} bytes extra: something N x M was allocated"


def test_side_stream_and_extra_batch_dims():
    _available()
    theta = torch.randn(2, 3, 130, 40, device="cuda")
    phi = torch.randn(2, 3, 70, 40, device="cuda")
    g = torch.randn(2, 3, 70, 24, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        checks = compare_with_oracle(theta, phi, g, backend="cuda", scale=0.2)
    torch.cuda.synchronize()
    assert_all_ok(checks)
