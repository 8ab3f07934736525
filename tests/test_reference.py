"""The oracle: float64 gradcheck and agreement with an independent loop formulation."""

import math

import pytest
import torch

from nonlocal_kernels import nonlocal_attention, nonlocal_reference
from nonlocal_kernels.testing import make_inputs, max_abs_diff

MODES = ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]


def loops(theta, phi, g, mode, scale, w):
    """y[b, i] = sum_j f(theta_i, phi_j) g_j / C, in Python floats, one element at a time."""
    B, N, dk = theta.shape
    M, dv = g.shape[1], g.shape[2]
    t, p, gg = theta.tolist(), phi.tolist(), g.tolist()
    wl = w.tolist() if w is not None else None
    y = [[[0.0] * dv for _ in range(N)] for _ in range(B)]
    lse = [[0.0] * N for _ in range(B)]
    for b in range(B):
        for i in range(N):
            dots = [sum(t[b][i][k] * p[b][j][k] for k in range(dk)) for j in range(M)]
            if mode in ("embedded_gaussian", "gaussian"):
                s = [scale * d for d in dots]
                mx = max(s)
                e = [math.exp(v - mx) for v in s]
                z = sum(e)
                f = [v / z for v in e]
                lse[b][i] = mx + math.log(z)
            elif mode == "dot_product":
                f = [d / M for d in dots]
            else:
                a = sum(t[b][i][k] * wl[k] for k in range(dk))
                f = [max(a + sum(p[b][j][k] * wl[dk + k] for k in range(dk)), 0.0) / M
                     for j in range(M)]
            for c in range(dv):
                y[b][i][c] = sum(f[j] * gg[b][j][c] for j in range(M))
    return torch.tensor(y, dtype=torch.float64), torch.tensor(lse, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_loops(mode):
    # Sub-sampled M != N, dk != dv, channels-first views.
    theta, phi, g, w = make_inputs(2, 7, 4, 3, 5, dtype=torch.float64, with_concat=True)
    w = w if mode == "concatenation" else None
    scale = 0.37 if mode in ("embedded_gaussian", "gaussian") else None
    want_y, want_lse = loops(theta, phi, g, mode, scale, w)
    if scale is not None:
        y, lse = nonlocal_attention(theta, phi, g, mode=mode, scale=scale, backend="reference",
                                    return_lse=True)
        assert max_abs_diff(lse, want_lse) < 1e-12
    else:
        y = nonlocal_attention(theta, phi, g, mode=mode, concat_weight=w, backend="reference")
    assert max_abs_diff(y, want_y) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    theta, phi, g, w = (t.detach().requires_grad_() for t in
                        make_inputs(2, 5, 4, 3, 2, dtype=torch.float64, with_concat=True))
    if mode == "concatenation":
        # Keep a_i + b_j away from ReLU's kink so finite differences are valid.
        with torch.no_grad():
            w.mul_(3.0)

        def fn(theta, phi, g, w):
            return nonlocal_attention(theta, phi, g, mode=mode, concat_weight=w,
                                      backend="reference")
        assert torch.autograd.gradcheck(fn, (theta, phi, g, w))
    elif mode == "dot_product":
        assert torch.autograd.gradcheck(
            lambda a, b, c: nonlocal_attention(a, b, c, mode=mode, backend="reference"),
            (theta, phi, g))
    else:
        def fn(theta, phi, g):
            y, lse = nonlocal_attention(theta, phi, g, mode=mode, scale=0.8, return_lse=True,
                                        backend="reference")
            return y, lse
        assert torch.autograd.gradcheck(fn, (theta, phi, g))


def test_lse_is_float32_for_low_precision_and_float64_for_float64():
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)):
        theta, phi, g = make_inputs(1, 4, 3, 2, 2, dtype=dtype)
        y, lse = nonlocal_reference(theta, phi, g, return_lse=True)
        assert y.dtype == dtype and lse.dtype == want and lse.shape == (1, 4)


def test_reference_softmax_rows_sum_to_one():
    from nonlocal_kernels.reference import pairwise_weight
    theta, phi, _ = make_inputs(3, 6, 5, 4, 1, dtype=torch.float64)
    p = pairwise_weight(theta, phi, "embedded_gaussian", 0.5)
    assert max_abs_diff(p.sum(-1), torch.ones(3, 6, dtype=torch.float64)) < 1e-12
