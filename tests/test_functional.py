"""nonlocal_attention: validation of every bad input (docs/design.md section 1), empty inputs, batch
dims, autocast, and the backend registry."""

import pytest
import torch

import nonlocal_kernels
from nonlocal_kernels import modes, nonlocal_attention
from nonlocal_kernels.backends import registry
from nonlocal_kernels.testing import assert_all_ok, compare_with_oracle, make_inputs, max_abs_diff


def inputs(B=2, N=5, M=4, dk=3, dv=6, dtype=torch.float32):
    return make_inputs(B, N, M, dk, dv, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(theta=torch.randn(5, 3)), ValueError, r"theta: expected shape \(B, N, dk\)"),
    (dict(phi=torch.randn(4, 3)), ValueError, r"phi: expected shape \(B, M, dk\)"),
    (dict(g=torch.randn(4)), ValueError, r"g: expected shape \(B, M, dv\)"),
    (dict(phi=torch.randn(3, 4, 3)), ValueError, r"phi: expected shape \(2, M, 3\)"),
    (dict(phi=torch.randn(2, 4, 5)), ValueError, r"phi: expected shape \(2, M, 3\)"),
    (dict(g=torch.randn(2, 7, 6)), ValueError, r"g: expected shape \(2, 4, dv\)"),
    (dict(g=torch.randn(1, 4, 6)), ValueError, r"g: expected shape \(2, 4, dv\)"),
    (dict(phi=torch.randn(2, 0, 3), g=torch.randn(2, 0, 6)), ValueError, r"phi: M .* >= 1"),
    (dict(theta=torch.randn(2, 5, 0), phi=torch.randn(2, 4, 0)), ValueError, r"theta: dk"),
    (dict(phi=torch.randn(2, 4, 3, dtype=torch.float64)), TypeError, r"phi: expected dtype"),
    (dict(g=torch.randn(2, 4, 6).half()), TypeError, r"g: expected dtype"),
    (dict(theta=torch.ones(2, 5, 3, dtype=torch.int64)), TypeError, r"theta: expected a floating"),
    (dict(theta=[[1.0]]), TypeError, r"theta: expected a torch.Tensor"),
    (dict(phi=torch.randn(2, 4, 3, device="meta")), ValueError, r"phi: expected device cpu"),
    (dict(mode="gaussain"), ValueError, r"mode: unknown mode 'gaussain'"),
    (dict(backend="cuda_magic"), ValueError, r"backend: unknown backend 'cuda_magic'"),
    (dict(backend=3), TypeError, r"backend: expected a str"),
    (dict(mode="concatenation"), ValueError, r"concat_weight: mode 'concatenation' needs"),
    (dict(mode="concatenation", concat_weight=torch.randn(5)), ValueError,
     r"concat_weight: expected shape \(6,\)"),
    (dict(mode="concatenation", concat_weight=torch.randn(6).double()), TypeError,
     r"concat_weight: expected dtype"),
    (dict(concat_weight=torch.randn(6)), ValueError, r"concat_weight: only mode"),
    (dict(mode="dot_product", scale=2.0), ValueError, r"scale: applies to the softmax modes"),
    (dict(scale="big"), TypeError, r"scale: expected a real number"),
    (dict(scale=float("inf")), ValueError, r"scale: expected a finite"),
    (dict(mode="dot_product", return_lse=True), ValueError, r"return_lse: only the softmax"),
    (dict(return_lse=1), TypeError, r"return_lse: expected a bool"),
])
def test_bad_input_raises_naming_the_argument(kwargs, exc, match):
    theta, phi, g = inputs()
    args = dict(theta=theta, phi=phi, g=g)
    args.update({k: kwargs.pop(k) for k in ("theta", "phi", "g") if k in kwargs})
    with pytest.raises(exc, match=match):
        nonlocal_attention(args["theta"], args["phi"], args["g"], **kwargs)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_empty_n_returns_empty_result_with_gradients(mode):
    theta = torch.randn(2, 0, 3, requires_grad=True)
    phi = torch.randn(2, 4, 3, requires_grad=True)
    g = torch.randn(2, 4, 6, requires_grad=True)
    w = torch.randn(6) if modes.get(mode).takes_concat_weight else None
    y = nonlocal_attention(theta, phi, g, mode=mode, concat_weight=w)
    assert y.shape == (2, 0, 6) and y.dtype == torch.float32
    y.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() == 0
    if mode == "embedded_gaussian":
        y, lse = nonlocal_attention(theta, phi, g, return_lse=True)
        assert lse.shape == (2, 0) and lse.dtype == torch.float32


def test_empty_batch_and_dv():
    theta, phi, g = torch.randn(0, 5, 3), torch.randn(0, 4, 3), torch.randn(0, 4, 2)
    assert nonlocal_attention(theta, phi, g).shape == (0, 5, 2)
    theta, phi, g = inputs(dv=0)
    assert nonlocal_attention(theta, phi, g).shape == (2, 5, 0)


def test_extra_leading_batch_dims_match_flat_batch():
    theta, phi, g = make_inputs(6, 5, 4, 3, 2, dtype=torch.float64)
    flat = nonlocal_attention(theta, phi, g, scale=0.3, backend="reference")
    y, lse = nonlocal_attention(theta.reshape(2, 3, 5, 3), phi.reshape(2, 3, 4, 3),
                                g.reshape(2, 3, 4, 2), scale=0.3, return_lse=True,
                                backend="reference")
    assert y.shape == (2, 3, 5, 2) and lse.shape == (2, 3, 5)
    assert max_abs_diff(y.reshape(6, 5, 2), flat) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first", "strided"])
def test_reference_backend_every_dtype_and_layout(dtype, layout):
    theta, phi, g = make_inputs(2, 9, 6, 5, 3, dtype=dtype, layout=layout)
    assert_all_ok(compare_with_oracle(theta, phi, g, backend="reference", scale=0.4,
                                      return_lse=True))


def test_autocast_does_not_change_the_computation_dtype():
    theta, phi, g = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nonlocal_attention(theta, phi, g)
    assert y.dtype == torch.float32
    assert max_abs_diff(y, nonlocal_attention(theta, phi, g)) == 0.0


def test_available_backends_lists_reference_with_its_status():
    rows = {b["name"]: b for b in nonlocal_kernels.available_backends()}
    ref = rows["reference"]
    assert ref["available"] and ref["reason"] is None
    assert set(ref["modes"]) == set(modes.NAMES)
    assert set(ref["dtypes"]) == {"float64", "float32", "float16", "bfloat16"}


def _fake_backend(name, priority=10, reason=None, families=registry.FAMILIES, auto=True,
                  calls=None, accepts=None):
    def run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
        calls.append(name)
        return registry.get("reference").run(theta, phi, g, mode=mode, scale=scale,
                                             concat_weight=concat_weight, return_lse=return_lse)
    return registry.Backend(name=name, description="test", families=families,
                            dtypes=modes.FLOAT_DTYPES, devices=("cpu",), run=run,
                            priority=priority, unavailable_reason=lambda: reason,
                            how_to_enable="Install the frobnicator." if reason else "", auto=auto,
                            accepts=accepts)


def test_auto_picks_highest_priority_available_backend(monkeypatch):
    # Only the reference and the fakes: the real backends (priorities up to 200) stay out.
    monkeypatch.setattr(registry, "_REGISTRY", {"reference": registry.get("reference")})
    calls = []
    for b in (_fake_backend("t_low", 10, calls=calls), _fake_backend("t_high", 20, calls=calls),
              _fake_backend("t_missing", 30, reason="frobnicator not installed", calls=calls),
              _fake_backend("t_testonly", 40, auto=False, calls=calls),
              _fake_backend("t_dotonly", 50, families=("dot_product",), calls=calls)):
        monkeypatch.setitem(registry._REGISTRY, b.name, b)
    theta, phi, g = inputs()
    nonlocal_attention(theta, phi, g)
    nonlocal_attention(theta, phi, g, mode="dot_product")
    assert calls == ["t_high", "t_dotonly"]


def test_naming_an_unavailable_backend_says_what_is_missing(monkeypatch):
    b = _fake_backend("t_missing", 30, reason="frobnicator not installed", calls=[])
    monkeypatch.setitem(registry._REGISTRY, b.name, b)
    theta, phi, g = inputs()
    with pytest.raises(RuntimeError, match="'t_missing' is not available: frobnicator not "
                                           "installed. Install the frobnicator."):
        nonlocal_attention(theta, phi, g, backend="t_missing")


def test_naming_a_backend_that_cannot_run_the_call(monkeypatch):
    b = _fake_backend("t_dotonly", families=("dot_product",), calls=[])
    monkeypatch.setitem(registry._REGISTRY, b.name, b)
    theta, phi, g = inputs()
    with pytest.raises(ValueError, match="'t_dotonly' cannot run this call: mode "
                                         "'embedded_gaussian' is not supported"):
        nonlocal_attention(theta, phi, g, backend="t_dotonly")


def test_a_per_call_refusal_is_an_error_when_named_and_passes_auto_on(monkeypatch):
    # accepts(theta, phi, g, mode): None runs the call; a reason refuses it. select asks it for
    # a named backend (the reason becomes the error) and for each auto candidate (the next one
    # runs the call).
    monkeypatch.setattr(registry, "_REGISTRY", {"reference": registry.get("reference")})
    calls, seen = [], []

    def narrow(theta, phi, g, mode):
        seen.append((tuple(theta.shape), tuple(phi.shape), tuple(g.shape), mode))
        if theta.shape[-1] != g.shape[-1]:
            return f"g: dv = {g.shape[-1]} differs from dk = {theta.shape[-1]}"
        return None

    for b in (_fake_backend("t_narrow", 30, calls=calls, accepts=narrow),
              _fake_backend("t_wide", 20, calls=calls),
              _fake_backend("t_gpu_auto", 40, calls=calls, auto=("cuda",))):
        monkeypatch.setitem(registry._REGISTRY, b.name, b)
    square = make_inputs(2, 7, 5, 4, 4)
    ragged = make_inputs(2, 7, 5, 4, 3)
    nonlocal_attention(*square)
    nonlocal_attention(*ragged)
    assert calls == ["t_narrow", "t_wide"]  # t_gpu_auto: auto only on CUDA
    assert seen[-1] == ((2, 7, 4), (2, 5, 4), (2, 5, 3), "embedded_gaussian")
    with pytest.raises(ValueError, match="'t_narrow' cannot run this call: g: dv = 3 differs "
                                         "from dk = 4"):
        nonlocal_attention(*ragged, backend="t_narrow")
    nonlocal_attention(*ragged, backend="t_gpu_auto")  # named, it runs on CPU
    assert calls[-1] == "t_gpu_auto"
    info = {b["name"]: b for b in nonlocal_kernels.available_backends()}
    assert info["t_gpu_auto"]["auto"] == ["cuda"] and info["t_wide"]["auto"] is True


def test_registry_rejects_duplicates_and_unknown_modes():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_fake_backend("reference", calls=[]))
    with pytest.raises(ValueError, match="unknown family"):
        registry.register(_fake_backend("t_bad", families=("cosine",), calls=[]))
