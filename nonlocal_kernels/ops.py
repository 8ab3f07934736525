"""The compiled operators: loading ``nonlocal_kernels._C``, fake (meta) implementations so
``torch.compile`` can trace the ops, and the one autograd.Function that every compiled
softmax-family backend (cpu, cuda, cuda_emu, triton) wraps around its forward/backward op pair.

Op schemas (csrc/ops.cpp, namespace ``nonlocal_kernels``), on 3-D tensors of any strides:

    softmax_fwd(theta (B,N,dk), phi (B,M,dk), g (B,M,dv), float scale) -> (y (B,N,dv), lse (B,N))
    softmax_bwd(dy, theta, phi, g, y, lse, float scale) -> (dtheta, dphi, dg)

``lse`` is float32, or float64 for float64 inputs (so float64 gradcheck runs on the kernels).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.nonlocal_kernels.*)
    _C_ERROR: Optional[str] = None
except ImportError as exc:  # not built: the package still works with backend="reference"
    _C = None
    _C_ERROR = str(exc)

BUILD_HINT = ("Build the extension with `make setup` (or "
              "`pip install --no-build-isolation -e .` in an environment that has torch).")
NAMESPACE = "nonlocal_kernels"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def extension_unavailable_reason() -> Optional[str]:
    if _C is None:
        return f"nonlocal_kernels._C is not built or failed to load ({_C_ERROR})"
    return None


def _op_exists(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def kernel_unavailable_reason(dispatch_key: str, namespace: str = NAMESPACE) -> Optional[str]:
    """None when namespace::softmax_fwd/bwd both have a kernel for dispatch_key (e.g. "CPU")."""
    for op in ("softmax_fwd", "softmax_bwd"):
        qualname = f"{namespace}::{op}"
        if not _op_exists(qualname):
            return f"operator {qualname} is not registered"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key):
            return f"operator {qualname} has no {dispatch_key} kernel in this build"
    return None


def register_softmax_fakes(namespace: str) -> None:
    """Fake implementations of namespace::softmax_fwd/bwd (shapes and dtypes only)."""

    @torch.library.register_fake(f"{namespace}::softmax_fwd")
    def _fwd_fake(theta, phi, g, scale):
        B, N, _ = theta.shape
        y = theta.new_empty((B, N, g.shape[-1]), dtype=g.dtype)
        lse = theta.new_empty((B, N), dtype=lse_dtype(theta.dtype))
        return y, lse

    @torch.library.register_fake(f"{namespace}::softmax_bwd")
    def _bwd_fake(dy, theta, phi, g, y, lse, scale):
        return torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g)


if _C is not None:
    register_softmax_fakes(NAMESPACE)


def make_softmax_function(fwd: Callable, bwd: Callable, name: str) -> type:
    """An autograd.Function over a (softmax_fwd, softmax_bwd) pair.

    apply(theta, phi, g, scale) -> (y, lse). A gradient flowing into lse is supported without
    changing the kernels: d lse_i / d S_ij = P_ij, so it only shifts D_i = rowsum(dy_i * y_i) by
    -dlse_i. Appending a column (y: 1, dy: -dlse, g: 0) to the backward's inputs does exactly that;
    the extra column of dg is dropped. It costs O((N + M) dv) and only runs when lse is used.
    """

    def forward(theta, phi, g, scale):
        return fwd(theta, phi, g, scale)

    def setup_context(ctx, inputs, output):
        theta, phi, g, scale = inputs
        y, lse = output
        ctx.save_for_backward(theta, phi, g, y, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, dlse):
        theta, phi, g, y, lse = ctx.saved_tensors
        if dy is None and dlse is None:
            return None, None, None, None
        if dy is None:
            dy = torch.zeros_like(y)
        if dlse is not None:
            y = torch.cat([y, y.new_ones(y.shape[:-1] + (1,))], dim=-1)
            dy = torch.cat([dy, -dlse.to(dy.dtype).unsqueeze(-1)], dim=-1)
            g = torch.cat([g, g.new_zeros(g.shape[:-1] + (1,))], dim=-1)
        dtheta, dphi, dg = bwd(dy, theta, phi, g, y, lse, ctx.scale)
        if dlse is not None:
            dg = dg[..., :-1]
        return dtheta, dphi, dg, None

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })
