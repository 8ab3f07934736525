"""Error measures and the tolerance rule (docs/design.md section 5), shared by tests and benchmarks.

The rule: compute the oracle in float64 (``ref64``) and the plain reference in the dtype under
test (``ref_lp``). A result passes when

    max|out - ref64| <= factor * max|ref_lp - ref64| + 1e-6 * max|ref64|

with factor 2 for outputs and 3 for gradients: a fused kernel may be no less accurate than
PyTorch itself in the same precision. float32 with TF32 dot products is held to PyTorch's
float16 error on the same data (TF32 keeps float16's 10-bit mantissa).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
REL_FLOOR = 1e-6


def max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| computed in float64 (NaN if either holds a NaN, so NaN never passes)."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - b.detach().double()).abs()
    return float("nan") if torch.isnan(d).any() else d.max().item()


def tolerance(ref_lp: torch.Tensor, ref64: torch.Tensor, factor: float) -> float:
    return factor * max_abs_diff(ref_lp, ref64) + REL_FLOOR * max_abs(ref64)


@dataclasses.dataclass
class Check:
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # False for NaN

    def __str__(self) -> str:
        return f"{self.name}: max|err| {self.error:.3e} vs tol {self.tol:.3e}"


def check_close(out: torch.Tensor, ref_lp: torch.Tensor, ref64: torch.Tensor, *,
                name: str = "output", grad: bool = False) -> Check:
    """Apply the rule to one tensor; returns the Check (see assert_all_ok)."""
    if out is None or ref64 is None:
        raise AssertionError(f"{name}: missing tensor (out={out is not None}, "
                             f"ref={ref64 is not None})")
    if out.dtype != ref_lp.dtype:
        raise AssertionError(f"{name}: dtype {out.dtype}, expected {ref_lp.dtype}")
    factor = GRAD_FACTOR if grad else OUTPUT_FACTOR
    return Check(name, max_abs_diff(out, ref64), tolerance(ref_lp, ref64, factor))


def assert_all_ok(checks: list) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        raise AssertionError("outside the tolerance rule (docs/design.md section 5): " +
                             "; ".join(str(c) for c in bad) +
                             " | all: " + "; ".join(str(c) for c in checks))


def make_inputs(B: int, N: int, M: int, dk: int, dv: int, *, dtype=torch.float32,
                device="cpu", layout: str = "channels_first", with_concat: bool = False,
                generator: Optional[torch.Generator] = None):
    """Fresh random theta (B,N,dk), phi (B,M,dk), g (B,M,dv) [, concat_weight (2dk,)].

    layout: "contiguous"; "channels_first" (views t.transpose(1, 2) of (B, d, N) tensors, as
    the modules pass them); "strided" (every other element of the last dim of a wider tensor).
    """
    def make(n, d):
        if layout == "contiguous":
            return torch.randn(B, n, d, dtype=dtype, device=device, generator=generator)
        if layout == "channels_first":
            return torch.randn(B, d, n, dtype=dtype, device=device,
                               generator=generator).transpose(1, 2)
        if layout == "strided":
            return torch.randn(B, n, 2 * d, dtype=dtype, device=device,
                               generator=generator)[..., ::2]
        raise ValueError(f"layout: unknown layout {layout!r}")

    out = [make(N, dk), make(M, dk), make(M, dv)]
    if with_concat:
        out.append(torch.randn(2 * dk, dtype=dtype, device=device, generator=generator))
    return tuple(out)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (a kernel that fails to write an element then fails every check)."""
    return t.fill_(float("nan"))


def _leaf(t: Optional[torch.Tensor], dtype=None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(True)  # detach() keeps strides, so the view layout is kept


def compare_with_oracle(theta, phi, g, *, backend: str, mode: str = "embedded_gaussian",
                        scale=None, concat_weight=None, return_lse: bool = False,
                        backward: bool = True, tf32: bool = False) -> list:
    """Run nonlocal_attention(backend=...) and the reference (test dtype and float64) on the same
    inputs (their strides kept), with the same fresh random upstream gradient; return a Check
    for y, lse (if asked) and every input gradient. Use assert_all_ok on the result."""
    from .functional import nonlocal_attention

    dtype = theta.dtype
    ref_dtype = torch.float16 if tf32 else dtype
    kw = dict(mode=mode, scale=scale, return_lse=return_lse)

    def run(dt, be):
        ins = [_leaf(t, None if dt == dtype else dt) for t in (theta, phi, g, concat_weight)]
        out = nonlocal_attention(*ins[:3], concat_weight=ins[3], backend=be, **kw)
        return ins, (out if return_lse else (out,))

    cand_in, cand_out = run(dtype, backend)
    lp_in, lp_out = run(ref_dtype, "reference")
    hi_in, hi_out = run(torch.float64, "reference")
    names = ["y", "lse"][:len(cand_out)]
    checks = [check_close(c, lp.to(c.dtype) if tf32 else lp, hi, name=n)
              for n, c, lp, hi in zip(names, cand_out, lp_out, hi_out)]
    if backward:
        dy = torch.randn_like(cand_out[0], memory_format=torch.contiguous_format)
        extra = [torch.randn_like(cand_out[1])] if return_lse else []
        for ins, outs in ((cand_in, cand_out), (lp_in, lp_out), (hi_in, hi_out)):
            grads = [dy.to(outs[0].dtype)] + [e.to(outs[1].dtype) for e in extra]
            torch.autograd.backward(list(outs), grads)
        for n, c, lp, hi in zip(("dtheta", "dphi", "dg", "dconcat_weight"),
                                cand_in, lp_in, hi_in):
            if c is None:
                continue
            checks.append(check_close(c.grad, lp.grad.to(c.dtype) if tf32 else lp.grad,
                                      hi.grad, name=n, grad=True))
    return checks
