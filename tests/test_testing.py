"""The tolerance helper itself: it must pass the oracle and fail wrong results."""

import math

import pytest
import torch

from nonlocal_kernels import testing
from nonlocal_kernels.modes import FLOAT_DTYPES
from nonlocal_kernels.testing import (Check, assert_all_ok, check_close, compare_with_oracle,
                                      make_inputs, max_abs_diff, poison_, tolerance)


def test_tolerance_formula():
    ref64 = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    ref_lp = torch.tensor([1.5, -4.0, 2.0], dtype=torch.float32)
    assert tolerance(ref_lp, ref64, 2.0) == pytest.approx(2 * 0.5 + 1e-6 * 4.0)
    assert tolerance(ref_lp, ref64, 3.0) == pytest.approx(3 * 0.5 + 1e-6 * 4.0)


def test_check_close_passes_and_fails_at_the_bound():
    ref64 = torch.randn(50, dtype=torch.float64)
    ref_lp = ref64.float() + 1e-3 * torch.randn(50)
    err = max_abs_diff(ref_lp, ref64)
    tol = 2 * err + 1e-6 * ref64.abs().max().item()
    close = ref64.float() + torch.full((50,), 0.9 * tol).float()
    far = ref64.float()
    far[7] += 1.1 * tol
    assert check_close(close, ref_lp, ref64).ok
    c = check_close(far, ref_lp, ref64)
    assert not c.ok and c.error > c.tol
    with pytest.raises(AssertionError,
                       match=r"outside the tolerance rule \(docs/design.md section 5\)"):
        assert_all_ok([c])
    # Gradients get 3x: the same error passes as a gradient.
    assert check_close(far, ref_lp, ref64, grad=True).ok


def test_nan_never_passes():
    ref64 = torch.randn(10, dtype=torch.float64)
    out = ref64.float()
    out[3] = float("nan")
    c = check_close(out, ref64.float(), ref64)
    assert math.isnan(c.error) and not c.ok
    assert torch.isnan(poison_(torch.empty(4))).all()


def test_dtype_and_shape_mismatch_fail():
    ref64 = torch.randn(4, dtype=torch.float64)
    with pytest.raises(AssertionError, match="dtype"):
        check_close(ref64.half(), ref64.float(), ref64)
    with pytest.raises(AssertionError, match="shape"):
        max_abs_diff(torch.zeros(3), torch.zeros(4))
    with pytest.raises(AssertionError, match="missing"):
        check_close(None, ref64.float(), ref64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_first", "strided"])
def test_make_inputs_layouts(layout):
    theta, phi, g, w = make_inputs(2, 7, 5, 3, 4, layout=layout, with_concat=True)
    assert theta.shape == (2, 7, 3) and phi.shape == (2, 5, 3) and g.shape == (2, 5, 4)
    assert w.shape == (6,)
    assert theta.is_contiguous() == (layout == "contiguous")
    assert theta.abs().sum() > 0  # random, never zeros
    with pytest.raises(ValueError, match="layout"):
        make_inputs(1, 2, 2, 2, 2, layout="bogus")


def test_compare_with_oracle_catches_a_wrong_backend(monkeypatch):
    """A backend that is slightly off (wrong scale) must fail; the reference itself passes."""
    from nonlocal_kernels.backends import registry
    from nonlocal_kernels.reference import nonlocal_reference

    def wrong(theta, phi, g, *, mode, scale, concat_weight, return_lse):
        return nonlocal_reference(theta, phi, g, mode=mode, scale=scale * 1.01,
                                  concat_weight=concat_weight, return_lse=return_lse)

    monkeypatch.setitem(registry._REGISTRY, "wrong_for_test", registry.Backend(
        name="wrong_for_test", description="", families=registry.FAMILIES,
        dtypes=FLOAT_DTYPES, devices=("cpu",), run=wrong, auto=False))
    inputs = make_inputs(2, 9, 6, 5, 3)
    assert_all_ok(compare_with_oracle(*inputs, backend="reference", scale=0.5))
    checks = compare_with_oracle(*inputs, backend="wrong_for_test", scale=0.5)
    assert not all(c.ok for c in checks)
    with pytest.raises(AssertionError):
        assert_all_ok(checks)


def test_tf32_bound_uses_float16_reference():
    theta, phi, g = make_inputs(1, 8, 8, 4, 4)
    checks = compare_with_oracle(theta, phi, g, backend="reference", tf32=True)
    assert_all_ok(checks)
    assert all(isinstance(c, Check) for c in checks) and len(checks) == 4
    assert testing.GRAD_FACTOR == 3.0 and testing.OUTPUT_FACTOR == 2.0
