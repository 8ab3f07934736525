"""The CUDA kernels (csrc/cuda) run by the host emulator (backend ``cuda_emu``, CPU tensors)
against the float64 oracle with the docs/design.md section 5 rule: ragged N/M, odd and large dk/dv,
dk != dv, strided inputs, float32 / float16 / bfloat16 (and TF32), forward and every gradient,
under several thread run orders. Shapes stay small: the emulator runs every CUDA thread as a
fiber on the CPU.
"""

import pytest
import torch

from nonlocal_kernels import nonlocal_attention
from nonlocal_kernels.backends import cuda_emu, registry
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs

_REASON = registry.get("cuda_emu").unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cuda_emu: {_REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = ["forward", "reverse", "random:1"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 takes the exact path unless a test enables TF32 itself."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _check(shape, dtype, layout="channels_first", order="forward", scale=0.5, return_lse=True,
           tf32=False):
    theta, phi, g = make_inputs(*shape, dtype=dtype, layout=layout)
    with cuda_emu.run_order(order):
        checks = compare_with_oracle(theta, phi, g, backend="cuda_emu", scale=scale,
                                     return_lse=return_lse, tf32=tf32)
    assert_all_ok(checks)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_ragged_every_order(dtype, order):
    # N, M not multiples of the 64-row tiles; two query tiles; dk != dv, both odd.
    _check((2, 77, 45, 19, 23), dtype, order=order)


SHAPES = [
    pytest.param((1, 130, 70, 5, 3), "contiguous", id="multi-tile-ragged"),
    pytest.param((2, 50, 70, 9, 1), "channels_first", id="dk9-dv1"),
    pytest.param((1, 40, 33, 200, 150), "strided", id="dk200-dv150-strided"),
    pytest.param((1, 33, 40, 150, 200), "channels_first", id="dk150-dv200-channels-first"),
    pytest.param((1, 20, 17, 2100, 3), "contiguous", id="dk2100"),
    pytest.param((1, 20, 17, 3, 2100), "channels_first", id="dv2100"),
    pytest.param((3, 1, 64, 16, 16), "strided", id="N1-M64"),
    # Strides that are multiples of 16 bytes: the kernels' 16-byte vector loads.
    pytest.param((1, 136, 72, 40, 24), "channels_first", id="aligned-channels-first"),
    pytest.param((2, 70, 130, 72, 200), "contiguous", id="aligned-contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_shapes_layouts(shape, layout, dtype):
    if shape[3] > 1000 and dtype != torch.float16:
        shape = shape[:3] + (1030,) + shape[4:]  # keep the emulated run short; fp16 does 2100
    if shape[4] > 1000 and dtype != torch.bfloat16:
        shape = shape[:4] + (1030,)
    _check(shape, dtype, layout=layout, order="random:3")


def test_dk1():
    # float32 only. With dk = 1 (every score a single product) the float16/bfloat16 reference's
    # own error comes from a handful of roundings, and the kernels' D = rowsum(dy * y) (y rounded
    # to the input dtype, as in FlashAttention-2) puts dtheta at 2-4x that error for a few seeds
    # in a hundred, too close to the 3x rule to be a stable test. dv = 1 is covered in every dtype.
    _check((2, 9, 5, 1, 1), torch.float32, layout="contiguous")
    _check((2, 50, 70, 1, 1), torch.float32, layout="strided", order="reverse")
    _check((2, 50, 70, 1, 9), torch.float32, layout="channels_first", order="random:5")


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_tf32(order):
    torch.backends.cuda.matmul.allow_tf32 = True
    _check((2, 77, 45, 19, 23), torch.float32, order=order, tf32=True)
    _check((1, 40, 33, 70, 90), torch.float32, layout="strided", order=order, tf32=True)


@pytest.mark.parametrize("scale", [8.0, -3.0])
def test_large_and_negative_scale(scale):
    # Large logits: the online max subtraction must keep exp() finite.
    _check((1, 70, 90, 32, 8), torch.float32, scale=scale)
    _check((1, 70, 90, 32, 8), torch.float16, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_rows_ending_mid_vector(dtype):
    # 16-byte aligned rows whose valid part ends inside a vector: (.., 24)[..., :19] etc.
    theta = torch.randn(2, 70, 24, dtype=dtype)[..., :19]
    phi = torch.randn(2, 37, 24, dtype=dtype)[..., :19]
    g = torch.randn(2, 32, 40, dtype=dtype).transpose(1, 2)[:, :37, :23]  # columns of 40
    with cuda_emu.run_order("reverse"):
        assert_all_ok(compare_with_oracle(theta, phi, g, backend="cuda_emu", scale=0.5,
                                          return_lse=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bitwise_identical_across_orders(dtype):
    """Every output element is computed by one fixed sequence of operations, whatever order the
    threads and blocks run in: a race (a missing barrier) would change bits under some order."""
    theta, phi, g = make_inputs(2, 77, 70, 40, 24, dtype=dtype, layout="strided")
    results = []
    for order in ["forward", "reverse", "random:11", "random:12"]:
        ins = [t.detach().clone().requires_grad_(True) for t in (theta, phi, g)]
        with cuda_emu.run_order(order):
            y, lse = nonlocal_attention(*ins, backend="cuda_emu", scale=0.4, return_lse=True)
            (y * torch.randn_like(y, generator=torch.Generator().manual_seed(5))).sum().backward()
        results.append([y.detach(), lse.detach()] + [t.grad for t in ins])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_run_order_control():
    with cuda_emu.run_order("reverse"):
        assert cuda_emu.get_run_order() == "reverse"
        with cuda_emu.run_order("random:42"):
            assert cuda_emu.get_run_order() == "random:42"
        assert cuda_emu.get_run_order() == "reverse"
    with pytest.raises(RuntimeError, match="run order"):
        cuda_emu.set_run_order("sideways")


def test_backend_declaration():
    with pytest.raises(ValueError, match="cuda_emu"):
        nonlocal_attention(torch.randn(1, 4, 3, dtype=torch.float64),
                           torch.randn(1, 5, 3, dtype=torch.float64),
                           torch.randn(1, 5, 2, dtype=torch.float64), backend="cuda_emu")
    # Never picked automatically.
    from nonlocal_kernels.backends import registry
    assert not registry.get("cuda_emu").auto


def test_direct_op_checks():
    theta, phi, g = torch.randn(1, 4, 3), torch.randn(1, 5, 3), torch.randn(1, 5, 2)
    with pytest.raises(RuntimeError, match="phi"):
        torch.ops.nonlocal_kernels_emu.softmax_fwd(theta, phi[:, :, :2], g, 1.0)
    with pytest.raises(RuntimeError, match="M must be at least 1"):
        torch.ops.nonlocal_kernels_emu.softmax_fwd(theta, phi[:, :0], g[:, :0], 1.0)
    with pytest.raises(RuntimeError, match="not supported by the CUDA kernels"):
        torch.ops.nonlocal_kernels_emu.softmax_fwd(theta.double(), phi.double(), g.double(), 1.0)
    y, lse = torch.ops.nonlocal_kernels_emu.softmax_fwd(theta, phi, g, 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.nonlocal_kernels_emu.softmax_bwd(y, theta, phi, g, y, lse[:, :2], 1.0)
