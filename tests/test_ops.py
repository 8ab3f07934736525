"""The op layer: schemas, fakes, the registration every softmax namespace gets (checked with a
pure-PyTorch op pair written from the backward formulas of docs/design.md), and the package
working without the extension. Every backend's ops also go through tests/test_conformance.py."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nonlocal_kernels
from nonlocal_kernels import ops
from nonlocal_kernels.backends import registry
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs


def test_extension_is_built_and_registers_both_schemas():
    assert ops.extension_unavailable_reason() is None, (
        "nonlocal_kernels._C is missing: run `make setup` first")
    fwd = torch.ops.nonlocal_kernels.softmax_fwd.default._schema
    bwd = torch.ops.nonlocal_kernels.softmax_bwd.default._schema
    assert [a.name for a in fwd.arguments] == ["theta", "phi", "g", "scale"]
    assert [r.name for r in fwd.returns] == ["y", "lse"]
    assert [a.name for a in bwd.arguments] == ["dy", "theta", "phi", "g", "y", "lse", "scale"]
    assert len(bwd.returns) == 3


def test_python_and_cpp_schemas_agree():
    # csrc/ops_schema.h defines the C++ namespaces, ops.SOFTMAX_SCHEMAS the Triton and sdpa ones.
    namespaces = [ops.NAMESPACE, "nonlocal_kernels_emu", "nonlocal_kernels_triton",
                  "nonlocal_kernels_sdpa", PY_NS]
    for name, schema in ops.SOFTMAX_SCHEMAS.items():
        for ns in namespaces:
            if ops._op_exists(f"{ns}::{name}"):
                got = str(ops.op(f"{ns}::{name}")._schema)
                assert got == f"{ns}::{name}{schema}", got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_lse_dtype_is_the_same_in_cpp_and_python(dtype):
    theta, phi, g = make_inputs(1, 3, 2, 4, 2, dtype=dtype)
    _, lse = torch.ops.nonlocal_kernels.softmax_fwd(theta, phi, g, 1.0)
    assert lse.dtype == ops.lse_dtype(dtype)


@pytest.mark.parametrize("dtype,lse_dtype", [(torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)])
def test_fake_kernels_give_shapes_and_dtypes(dtype, lse_dtype):
    with FakeTensorMode():
        theta = torch.empty(3, 10, 8, dtype=dtype)
        phi = torch.empty(3, 7, 8, dtype=dtype)
        g = torch.empty(3, 7, 5, dtype=dtype)
        y, lse = torch.ops.nonlocal_kernels.softmax_fwd(theta, phi, g, 0.5)
        assert y.shape == (3, 10, 5) and y.dtype == dtype
        assert lse.shape == (3, 10) and lse.dtype == lse_dtype
        dt, dp, dg = torch.ops.nonlocal_kernels.softmax_bwd(y, theta, phi, g, y, lse, 0.5)
        assert dt.shape == theta.shape and dp.shape == phi.shape and dg.shape == g.shape


def test_kernel_unavailable_reason_names_the_missing_kernel():
    reason = ops.kernel_unavailable_reason("PrivateUse3")
    assert reason == ("operator nonlocal_kernels::softmax_fwd has no PrivateUse3 kernel in "
                      "this build")
    assert "is not registered" in ops.kernel_unavailable_reason("CPU", namespace="no_such_ns")


# A pure-PyTorch (softmax_fwd, softmax_bwd) op pair: exactly what a kernel computes, so the op
# layer (ops.register_softmax_ops, SoftmaxAttention, registry.softmax_backend) is tested before,
# and independently of, any kernel.
PY_NS = "nlk_test_py"


def _acc(t):  # accumulate in float32, float64 for float64 (like the kernels)
    return t.to(ops.lse_dtype(t.dtype))


@torch.library.custom_op(f"{PY_NS}::softmax_fwd", mutates_args=(),
                         schema=ops.SOFTMAX_SCHEMAS["softmax_fwd"])
def _py_fwd(theta, phi, g, scale):
    s = scale * (_acc(theta) @ _acc(phi).transpose(1, 2))
    lse = torch.logsumexp(s, -1)
    y = (torch.exp(s - lse.unsqueeze(-1)) @ _acc(g)).to(g.dtype)
    return y, lse


@torch.library.custom_op(f"{PY_NS}::softmax_bwd", mutates_args=(),
                         schema=ops.SOFTMAX_SCHEMAS["softmax_bwd"])
def _py_bwd(dy, theta, phi, g, y, lse, scale):
    s = scale * (_acc(theta) @ _acc(phi).transpose(1, 2))
    p = torch.exp(s - lse.unsqueeze(-1))
    dg = p.transpose(1, 2) @ _acc(dy)
    d = (_acc(dy) * _acc(y)).sum(-1, keepdim=True)
    ds = p * (_acc(dy) @ _acc(g).transpose(1, 2) - d)
    return ((scale * ds @ _acc(phi)).to(theta.dtype),
            (scale * ds.transpose(1, 2) @ _acc(theta)).to(phi.dtype), dg.to(g.dtype))


ops.register_softmax_ops(PY_NS)


@pytest.fixture
def py_backend(monkeypatch):
    b = registry.softmax_backend(
        name="t_pyops", namespace=PY_NS, dispatch_key="CompositeExplicitAutograd",
        description="test", devices=("cpu",), dtypes=(torch.float64, torch.float32),
        priority=0, how_to_enable="", auto=False)
    assert b.unavailable_reason() is None
    monkeypatch.setitem(registry._REGISTRY, b.name, b)
    return b.name


@pytest.mark.parametrize("return_lse", [False, True])
def test_softmax_op_layer_matches_the_oracle(py_backend, return_lse):
    theta, phi, g = make_inputs(2, 11, 7, 5, 3, layout="channels_first")
    assert_all_ok(compare_with_oracle(theta, phi, g, backend=py_backend, scale=0.7,
                                      return_lse=return_lse))


def test_softmax_op_layer_gradcheck_through_y_and_lse(py_backend):
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(2, 6, 5, 3, 4, dtype=torch.float64))

    def fn(theta, phi, g):
        return nonlocal_kernels.nonlocal_attention(theta, phi, g, scale=0.9, return_lse=True,
                                                   backend=py_backend)
    assert torch.autograd.gradcheck(fn, (theta, phi, g))


def test_softmax_op_layer_lse_only_gradient(py_backend):
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(1, 6, 5, 3, 4, dtype=torch.float64))
    _, lse = nonlocal_kernels.nonlocal_attention(theta, phi, g, return_lse=True,
                                                 backend=py_backend)
    lse.sum().backward()
    t2, p2 = theta.detach().requires_grad_(), phi.detach().requires_grad_()
    torch.logsumexp(t2 @ p2.transpose(1, 2), -1).sum().backward()
    assert torch.allclose(theta.grad, t2.grad) and torch.allclose(phi.grad, p2.grad)
    assert g.grad is None or g.grad.abs().max() == 0


def test_the_ops_themselves_are_differentiable_once():
    # register_autograd on the op: a direct call of the forward op has the backward formula,
    # and a second derivative through the backward op raises instead of being wrong.
    theta, phi, g = (t.detach().requires_grad_() for t in
                     make_inputs(2, 6, 5, 3, 4, dtype=torch.float64))
    fwd = torch.ops.nlk_test_py.softmax_fwd
    assert torch.autograd.gradcheck(lambda t, p, v: fwd(t, p, v, 0.8), (theta, phi, g))
    y, _ = fwd(theta, phi, g, 0.8)
    (dt,) = torch.autograd.grad(y.square().sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* nlk_test_py::softmax_bwd"):
        dt.sum().backward()


def test_package_imports_and_reference_works_without_the_extension():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nonlocal_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, nonlocal_kernels
        from nonlocal_kernels import ops
        assert ops._C is None
        assert "blocked for the test" in ops.extension_unavailable_reason()
        t = torch.randn(1, 4, 3)
        y = nonlocal_kernels.nonlocal_attention(t, t, t, backend="reference")
        assert y.shape == (1, 4, 3)
        print("OK", [b["name"] for b in nonlocal_kernels.available_backends()])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")
