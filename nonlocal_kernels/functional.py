"""nonlocal_attention(): the public operator. Validates, flattens batch dims, dispatches."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch

from . import modes as _modes
from .backends import registry
from .modes import FLOAT_DTYPES


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate(theta, phi, g, mode, scale, concat_weight, return_lse, backend, min_keys=1):
    """The checked scale (None for modes without one); raises on bad input, naming the argument.
    ``min_keys``: the fewest key positions phi may hold (0 for one rank's shard under a group,
    distributed.py, which checks the group's total)."""
    m = _modes.get(mode)
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    for name, t in (("theta", theta), ("phi", phi), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype (float64, float32, float16, "
                            f"bfloat16), got {t.dtype}")
        if t.dim() < 3:
            want = {"theta": "(B, N, dk)", "phi": "(B, M, dk)", "g": "(B, M, dv)"}[name]
            raise ValueError(f"{name}: expected shape {want} with optional extra leading batch "
                             f"dims, got {_shape(t)} ({t.dim()}-D)")
    for name, t in (("phi", phi), ("g", g)):
        if t.device != theta.device:
            raise ValueError(f"{name}: expected device {theta.device} like theta, got {t.device}")
        if t.dtype != theta.dtype:
            raise TypeError(f"{name}: expected dtype {theta.dtype} like theta, got {t.dtype}")
    batch = theta.shape[:-2]
    N, dk = theta.shape[-2:]
    M = phi.shape[-2]
    if phi.shape[:-2] != batch or phi.shape[-1] != dk:
        raise ValueError(f"phi: expected shape ({', '.join(map(str, batch))}, M, {dk}) to match "
                         f"theta {_shape(theta)} in batch dims and dk, got {_shape(phi)}")
    if g.shape[:-2] != batch or g.shape[-2] != M:
        raise ValueError(f"g: expected shape ({', '.join(map(str, batch))}, {M}, dv) to match "
                         f"theta's batch dims and phi's M, got {_shape(g)}")
    if M < min_keys:
        raise ValueError(f"phi: M (number of key positions) must be >= 1, got phi {_shape(phi)}")
    if dk == 0:
        raise ValueError(f"theta: dk (last dim) must be >= 1, got theta {_shape(theta)}")

    if m.takes_scale:
        if scale is None:
            scale = 1.0
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale}")
    elif scale is not None:
        raise ValueError(f"scale: applies to the softmax modes only; mode {mode!r} divides by M "
                         f"(pass scale=None)")
    if return_lse and not m.has_lse:
        raise ValueError(f"return_lse: only the softmax modes have an lse, not mode {mode!r}")

    if m.takes_concat_weight:
        if concat_weight is None:
            raise ValueError(f"concat_weight: mode 'concatenation' needs concat_weight of shape "
                             f"({2 * dk},) = [w_theta, w_phi]")
        if not isinstance(concat_weight, torch.Tensor):
            raise TypeError(f"concat_weight: expected a torch.Tensor, got "
                            f"{type(concat_weight).__name__}")
        if concat_weight.shape != (2 * dk,):
            raise ValueError(f"concat_weight: expected shape ({2 * dk},) = [w_theta, w_phi] for "
                             f"dk = {dk}, got {_shape(concat_weight)}")
        if concat_weight.device != theta.device:
            raise ValueError(f"concat_weight: expected device {theta.device} like theta, got "
                             f"{concat_weight.device}")
        if concat_weight.dtype != theta.dtype:
            raise TypeError(f"concat_weight: expected dtype {theta.dtype} like theta, got "
                            f"{concat_weight.dtype}")
    elif concat_weight is not None:
        raise ValueError(f"concat_weight: only mode 'concatenation' takes it, not {mode!r}")
    return scale


# The device types that have autocast, decided once here: torch.compile traces
# nonlocal_attention and the modules, and dynamo in torch 2.11 cannot trace
# torch.amp.is_autocast_available (a graph break, so fullgraph=True failed there), while a set
# lookup traces everywhere.
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu")
                              if torch.amp.is_autocast_available(d))


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for one without autocast: meta)."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def _flatten_batch(t: torch.Tensor) -> torch.Tensor:
    # 3-D stays a view with its own strides; more batch dims are merged (a view when possible).
    # The batch size is spelled out: -1 cannot be inferred for a tensor with no elements (a
    # rank's empty shard under a group).
    return t if t.dim() == 3 else t.reshape((math.prod(t.shape[:-2]),) + tuple(t.shape[-2:]))


def nonlocal_attention(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, *,
                       mode: str = "embedded_gaussian", scale: Optional[float] = None,
                       concat_weight: Optional[torch.Tensor] = None, backend: str = "auto",
                       return_lse: bool = False, group=None):
    """Non-local aggregation y_i = sum_j f(theta_i, phi_j) g_j / C.

    theta (..., N, dk), phi (..., M, dk), g (..., M, dv) -> y (..., N, dv), same dtype/device.

    - ``embedded_gaussian`` / ``gaussian``: y = softmax_rows(scale * theta phi^T) g, scale 1.0
      by default; ``return_lse=True`` also returns lse (..., N) = logsumexp_j(scale theta_i.phi_j)
      in float32 (float64 for float64 inputs).
    - ``dot_product``: y = (theta phi^T) g / M.
    - ``concatenation``: y_i = (1/M) sum_j ReLU(theta_i.w_theta + phi_j.w_phi) g_j with
      concat_weight = [w_theta, w_phi] of shape (2 dk,).

    ``backend``: "auto" or a name from :func:`available_backends`. The computation runs in the
    input dtype (autocast does not change it; kernels accumulate in float32).

    ``group``: a ``torch.distributed`` process group for context parallelism: the inputs are
    this rank's shards of the positions (queries and keys), the result is this rank's y (and
    lse), every rank of the group calls together; see :mod:`nonlocal_kernels.distributed`.
    """
    if group is not None:
        from . import distributed
        return distributed.nonlocal_attention(theta, phi, g, mode=mode, scale=scale,
                                              concat_weight=concat_weight, backend=backend,
                                              return_lse=return_lse, group=group)
    scale = _validate(theta, phi, g, mode, scale, concat_weight, return_lse, backend)
    batch, N, dv = theta.shape[:-2], theta.shape[-2], g.shape[-1]
    if N == 0 or dv == 0 or math.prod(batch) == 0:
        # Empty result: the reference computes it for free and keeps the autograd graph.
        chosen = registry.get("reference")
    else:
        chosen = registry.select(backend, _flatten_batch(theta), _flatten_batch(phi),
                                 _flatten_batch(g), mode)
    return run_flat(chosen.run, theta, phi, g, mode=mode, scale=scale,
                    concat_weight=concat_weight, return_lse=return_lse)


def run_flat(run, theta, phi, g, *, mode, scale, concat_weight, return_lse):
    """``run(theta, phi, g, mode=, scale=, concat_weight=, return_lse=)`` (a backend's ``run``)
    on validated inputs with their batch dims merged into one, outside autocast; the result
    with theta's batch dims again."""
    batch, N, dv = theta.shape[:-2], theta.shape[-2], g.shape[-1]
    t3, p3, g3 = _flatten_batch(theta), _flatten_batch(phi), _flatten_batch(g)
    # The kernels run in the input dtype: autocast must not re-cast inside the reference path.
    # Only entered when autocast is on (an exported graph then holds the op itself, not an
    # autocast region; devices without autocast, e.g. "meta", never need it).
    device = theta.device.type
    autocasting = autocast_enabled(device)
    with torch.autocast(device, enabled=False) if autocasting else contextlib.nullcontext():
        out = run(t3, p3, g3, mode=mode, scale=scale, concat_weight=concat_weight,
                  return_lse=return_lse)
    if return_lse:
        y, lse = out
        return y.reshape(batch + (N, dv)), lse.reshape(batch + (N,))
    return out.reshape(batch + (N, dv))
