"""What is specific to backend ``sdpa`` (PyTorch's fused SDPA kernels through ATen ops called by
name); the conformance suite checks it like every backend (dk == dv shapes: it takes no other).
"""

import pytest
import torch

import nonlocal_kernels as nk
from nonlocal_kernels.backends import registry, sdpa
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs

HAS_CUDA = torch.cuda.is_available()

# The ATen ops the backend calls, with the arguments it passes positionally (then scale= by
# name). Their schemas are in every build of torch, CUDA ops included, so a renamed or reordered
# argument in another torch release shows here, on a machine without a GPU.
CALLS = {
    "_scaled_dot_product_flash_attention_for_cpu":
        ["query", "key", "value", "dropout_p", "is_causal"],
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        ["grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"],
    "_scaled_dot_product_flash_attention":
        ["query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"],
    "_scaled_dot_product_flash_attention_backward":
        ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k",
         "max_q", "max_k", "dropout_p", "is_causal", "philox_seed", "philox_offset"],
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_aten_ops_take_the_arguments_the_backend_passes(name):
    schema = getattr(torch.ops.aten, name).default._schema
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    assert positional[:len(CALLS[name])] == CALLS[name], str(schema)
    assert all(a.default_value is not None or a.kwarg_only
               for a in schema.arguments[len(CALLS[name]):] if not a.kwarg_only), str(schema)
    assert "scale" in [a.name for a in schema.arguments if a.kwarg_only], str(schema)
    # The forwards' first two outputs are (output, logsumexp).
    assert [r.name for r in schema.returns][:2] == (
        ["output", "logsumexp"] if not name.endswith("backward")
        else ["grad_query", "grad_key"]), str(schema)


def test_refuses_unequal_head_dims_naming_g_and_auto_keeps_cpu_on_cpu():
    theta, phi, g = make_inputs(2, 9, 7, 6, 5)
    with pytest.raises(ValueError, match="'sdpa' cannot run this call: g: dv = 5 differs from "
                                         "dk = 6.*backend 'cpu', 'cuda' or 'triton'"):
        nk.nonlocal_attention(theta, phi, g, backend="sdpa")
    theta, phi, g = make_inputs(2, 9, 7, 6, 6)
    assert registry.select("auto", theta, phi, g, "embedded_gaussian").name == "cpu"
    info = {b["name"]: b for b in nk.available_backends()}["sdpa"]
    assert info["available"] and info["auto"] == ["cuda"] and info["double_backward"] == []
    assert info["deterministic"] == ["cpu"] and info["priority"] > registry.get("triton").priority


@pytest.mark.parametrize("dk,dv", [(6, 5), (5, 6), (8, 9)])
def test_the_ops_pad_unequal_head_dims_exactly(dk, dv):
    # The backend routes only dk == dv here; the ops themselves take any head dims (zero
    # columns), which the backward needs for the gradient into lse (g one column wider).
    t, p, g = make_inputs(2, 13, 11, dk, dv, dtype=torch.float64, layout="strided")
    y, lse = torch.ops.nonlocal_kernels_sdpa.softmax_fwd(t, p, g, 0.4)
    ref_y, ref_lse = nk.nonlocal_attention(t, p, g, scale=0.4, backend="reference",
                                           return_lse=True)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.ops.nonlocal_kernels_sdpa.softmax_bwd(dy, t, p, g, y, lse, 0.4)
    leaves = [x.detach().requires_grad_() for x in (t, p, g)]
    nk.nonlocal_attention(*leaves, scale=0.4, backend="reference").backward(dy)
    for got, x in zip(grads, leaves):
        assert got.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


# --- on a GPU (scripts/gpu_check.sh) --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 29, 24, 24), (2, 300, 200, 64, 64),
                                   (1, 257, 300, 250, 250), (2, 130, 70, 256, 256)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first", "strided"])
def test_matches_the_oracle_gpu(dtype, shape, layout):
    B, N, M, dk, dv = shape
    t, p, g = make_inputs(B, N, M, dk, dv, dtype=dtype, device="cuda", layout=layout)
    # A gradient into lse makes dv one wider, padded to a multiple of 8: up to 256 for dk <= 255.
    lse = dk <= 255
    assert_all_ok(compare_with_oracle(t, p, g, backend="sdpa", scale=dk ** -0.5,
                                      return_lse=lse))


@pytest.mark.gpu
def test_a_gradient_into_lse_past_the_head_dim_limit_is_refused_gpu():
    t, p, g = (x.requires_grad_() for x in make_inputs(1, 64, 48, 256, 256,
                                                       dtype=torch.bfloat16, device="cuda"))
    y, lse = nk.nonlocal_attention(t, p, g, backend="sdpa", return_lse=True)
    y.sum().backward(retain_graph=True)  # no gradient into lse: runs
    with pytest.raises(RuntimeError, match="head dims up to 256.*backend='triton'"):
        lse.sum().backward()


@pytest.mark.gpu
def test_auto_takes_sdpa_where_flash_runs_and_triton_beyond_gpu():
    def pick(dk, dv, dtype):
        t, p, g = make_inputs(1, 64, 48, dk, dv, dtype=dtype, device="cuda")
        return registry.select("auto", t, p, g, "embedded_gaussian").name
    assert pick(64, 64, torch.bfloat16) == "sdpa"
    assert pick(256, 256, torch.float16) == "sdpa"
    assert pick(512, 512, torch.bfloat16) == "triton"
    assert pick(1024, 512, torch.bfloat16) == "triton"
    assert pick(64, 64, torch.float32) == "triton"
    assert sdpa._cuda_device_ok(torch.device("cuda"))
