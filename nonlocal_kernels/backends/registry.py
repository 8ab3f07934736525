"""The one backend registry.

A backend declares which modes, dtypes and device types it supports, how to tell whether it is
available on this machine (and why not), and a ``run`` callable with the signature

    run(theta, phi, g, *, mode, scale, concat_weight, return_lse) -> y | (y, lse)

that receives validated 3-D tensors (B, N, dk), (B, M, dk), (B, M, dv) with any strides.
``nonlocal_attention`` (functional.py) does the validation and calls :func:`select`.

``backend="auto"`` picks, among the backends with ``auto=True`` that are available and support
the call, the one with the highest ``priority``. Test-only backends (``cuda_emu``, ``triton`` on
CPU under the interpreter) set ``auto=False`` or refuse in ``accepts``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

SOFTMAX_MODES = ("embedded_gaussian", "gaussian")
MODES = SOFTMAX_MODES + ("dot_product", "concatenation")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    modes: tuple
    dtypes: tuple
    devices: tuple  # torch device types, e.g. ("cpu",) or ("cuda",)
    run: Callable
    priority: int = 0
    # Returns None when usable here, else the reason it is not (what is missing).
    unavailable_reason: Callable[[], Optional[str]] = lambda: None
    # How to make it available; appended to the error when a user names it.
    how_to_enable: str = ""
    # Whether backend="auto" may pick it.
    auto: bool = True
    # Optional per-call refusal: (theta, phi, g, mode) -> None or a reason.
    accepts: Optional[Callable] = None

    def check_call(self, mode: str, dtype: torch.dtype, device_type: str) -> Optional[str]:
        """None when this backend supports the (mode, dtype, device type); else why not."""
        if mode not in self.modes:
            return f"mode {mode!r} is not supported (supported: {', '.join(self.modes)})"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} is not supported (supported: {names})"
        if device_type not in self.devices:
            return (f"device type {device_type!r} is not supported "
                    f"(supported: {', '.join(self.devices)})")
        return None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"backend {backend.name!r} is already registered")
    for m in backend.modes:
        if m not in MODES:
            raise ValueError(f"backend {backend.name!r} declares unknown mode {m!r}")
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected 'auto' or one of "
            f"{', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: (-_REGISTRY[n].priority, n))


def available_backends() -> list[dict]:
    """Every registered backend with its status, highest auto priority first."""
    out = []
    for name in names():
        b = _REGISTRY[name]
        reason = b.unavailable_reason()
        out.append({
            "name": name,
            "available": reason is None,
            "reason": reason,
            "how_to_enable": b.how_to_enable if reason else None,
            "modes": list(b.modes),
            "dtypes": [str(d).replace("torch.", "") for d in b.dtypes],
            "devices": list(b.devices),
            "auto": b.auto,
            "priority": b.priority,
            "description": b.description,
        })
    return out


def select(name: str, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
           mode: str) -> Backend:
    """The backend that runs this call; raises ValueError/RuntimeError with the reason."""
    dtype, device_type = theta.dtype, theta.device.type
    if name != "auto":
        b = get(name)
        reason = b.unavailable_reason()
        if reason is not None:
            hint = f" {b.how_to_enable}" if b.how_to_enable else ""
            raise RuntimeError(f"backend {name!r} is not available: {reason}.{hint}")
        reason = b.check_call(mode, dtype, device_type)
        if reason is None and b.accepts is not None:
            reason = b.accepts(theta, phi, g, mode)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return b
    refusals = []
    for n in names():
        b = _REGISTRY[n]
        if not b.auto:
            continue
        reason = b.check_call(mode, dtype, device_type) or b.unavailable_reason()
        if reason is None and b.accepts is not None:
            reason = b.accepts(theta, phi, g, mode)
        if reason is None:
            return b
        refusals.append(f"{n}: {reason}")
    raise ValueError("backend='auto' found no backend for mode "
                     f"{mode!r}, dtype {dtype}, device {device_type}: " + "; ".join(refusals))
