"""The correctness oracle: plain PyTorch that materialises the N x M affinity.

Every computation runs in the dtype of its inputs (so the same function is the float64 oracle
and the "PyTorch in the same precision" baseline of the tolerance rule); autograd does the
backward. Inputs are 3-D or more with matching leading batch dims; nothing here validates them
(functional.nonlocal_attention does).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import modes as _modes


def _softmax_logits(theta: torch.Tensor, phi: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (theta @ phi.transpose(-1, -2))


def _lse(logits: torch.Tensor) -> torch.Tensor:
    # float32 (float64 for float64 inputs), whatever the input dtype.
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def pairwise_weight(theta: torch.Tensor, phi: torch.Tensor, mode: str, scale: float = 1.0,
                    concat_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The normalised affinity f(x_i, x_j) / C(x), shape (..., N, M)."""
    M = phi.shape[-2]
    family = _modes.get(mode).family
    if family == "softmax":
        return torch.softmax(_softmax_logits(theta, phi, scale), dim=-1)
    if family == "dot_product":
        return (theta @ phi.transpose(-1, -2)) / M
    if family == "concatenation":
        dk = theta.shape[-1]
        a = theta @ concat_weight[:dk]  # (..., N)
        b = phi @ concat_weight[dk:]  # (..., M)
        return torch.relu(a.unsqueeze(-1) + b.unsqueeze(-2)) / M
    raise AssertionError(f"mode {mode!r}: family {family!r} has no reference formula")


def nonlocal_reference(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, *,
                       mode: str = "embedded_gaussian", scale: float = 1.0,
                       concat_weight: Optional[torch.Tensor] = None,
                       return_lse: bool = False):
    """y = pairwise_weight(theta, phi) @ g; with return_lse also the softmax lse (B, N)."""
    if return_lse:
        if not _modes.get(mode).has_lse:
            raise ValueError(f"return_lse: only the softmax modes have an lse, not {mode!r}")
        logits = _softmax_logits(theta, phi, scale)
        return torch.softmax(logits, dim=-1) @ g, _lse(logits)
    return pairwise_weight(theta, phi, mode, scale, concat_weight) @ g
