"""The one backend registry.

A backend is a declaration: the op families it implements (its modes follow from the modes
table, nonlocal_kernels/modes.py), the dtypes and device types it takes, its priority, whether
it is available here (and why not), and a ``run`` callable

    run(theta, phi, g, *, mode, scale, concat_weight, return_lse) -> y | (y, lse)

that receives validated 3-D tensors (B, N, dk), (B, M, dk), (B, M, dv) with any strides.
``nonlocal_attention`` (functional.py) validates and calls :func:`select`. A softmax-family
backend is declared by :func:`softmax_backend` from an op namespace and a dispatch key.

``backend="auto"`` picks, among the backends that ``auto`` may take on the call's device and that
are available and support the call, the one with the highest ``priority``. Test-only backends
(``cuda_emu``, ``triton`` on CPU under the interpreter) set ``auto=False``; ``sdpa`` sets
``auto=("cuda",)``.

What a call needs beyond its mode, dtype and device type (head dims, dk against dv) a backend
declares in ``accepts(theta, phi, g, mode)``: None when it runs the call, else the reason it
does not. ``select`` asks it for a named backend (a refusal is an error naming the reason) and for
every candidate of ``auto`` (a refusal passes the call on to the next backend).

Every backend also runs on ``meta`` tensors (its ops' fakes give shapes, dtypes and strides;
nothing runs), so a model built on the meta device can hold any backend's blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch

from .. import modes as _modes
from .. import ops

FAMILIES = tuple(dict.fromkeys(m.family for m in _modes.MODES.values()))


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    families: tuple  # op families it implements, a subset of FAMILIES
    dtypes: tuple
    devices: tuple  # torch device types, e.g. ("cpu",) or ("cuda",); "meta" always works
    run: Callable
    priority: int = 0
    # Returns None when usable here, else the reason it is not (what is missing).
    unavailable_reason: Callable[[], Optional[str]] = lambda: None
    # How to make it available; appended to the error when a user names it.
    how_to_enable: str = ""
    # Where backend="auto" may pick it: True (on every device it runs on), False (never: it
    # runs only when named) or a tuple of device types.
    auto: object = True
    # Per call, after mode, dtype and device type: (theta, phi, g, mode) -> None when it runs
    # this call, else why not (naming the argument). None: every call that passes check_call.
    accepts: Optional[Callable] = None
    # The families whose second derivatives it computes exactly; the others raise on a second
    # backward (ops.double_backward_error).
    double_backward: tuple = ()
    # Whether two runs on the same inputs give bit-identical outputs and gradients: True, or the
    # tuple of device types where they do.
    deterministic: object = True
    # The torch.library ops it runs ("namespace::name"), each with a fake, a vmap rule and
    # autograd (ops.py); tests/test_conformance.py runs opcheck on every one.
    ops: tuple = ()
    # A softmax backend's op namespace (its <namespace>::softmax_fwd / softmax_bwd): under a
    # process group, distributed.py runs these ops itself around its collectives.
    namespace: Optional[str] = None

    @property
    def modes(self) -> tuple:
        return tuple(m.name for m in _modes.MODES.values() if m.family in self.families)

    def auto_on(self, device_type: str) -> bool:
        """Whether backend="auto" may pick it for tensors on this device type."""
        if isinstance(self.auto, bool):
            return self.auto
        return device_type in self.auto or device_type == "meta"

    def deterministic_on(self, device_type: str) -> bool:
        if isinstance(self.deterministic, bool):
            return self.deterministic
        return device_type in self.deterministic

    def check_call(self, mode: str, dtype: torch.dtype, device_type: str) -> Optional[str]:
        """None when this backend supports the (mode, dtype, device type); else why not."""
        if mode not in self.modes:
            return f"mode {mode!r} is not supported (supported: {', '.join(self.modes)})"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} is not supported (supported: {names})"
        if device_type not in self.devices and device_type != "meta":
            return (f"device type {device_type!r} is not supported "
                    f"(supported: {', '.join(self.devices)})")
        return None


def softmax_backend(*, name: str, namespace: str, dispatch_key: str, description: str,
                    devices: tuple, dtypes: tuple, priority: int, how_to_enable: str,
                    not_loaded: Optional[str] = None, auto: bool = True,
                    keep: Optional[Callable] = None) -> Backend:
    """The declaration of a backend that runs the softmax family through namespace's
    softmax_fwd / softmax_bwd ops (ops.SoftmaxAttention). ``not_loaded``: why the library that
    registers the ops failed to load, if it did. Availability is decided here, once:
    torch.compile traces backend selection, and the dispatcher queries are not traceable.
    ``keep(theta, phi, g) -> Optional[bool]``: decides per call between namespace's
    softmax_keep_fwd / softmax_keep_bwd (True: keep the scores for the backward; False: do not)
    and the family's pair (None); see ops.softmax_runner."""
    names = ("softmax_fwd", "softmax_bwd") + (("softmax_keep_fwd", "softmax_keep_bwd")
                                              if keep is not None else ())
    reason = not_loaded or ops.kernel_unavailable_reason(dispatch_key, namespace, names)
    return Backend(name=name, description=description, families=("softmax",), dtypes=dtypes,
                   devices=devices, run=ops.softmax_runner(name, namespace, keep),
                   priority=priority, unavailable_reason=lambda: reason,
                   how_to_enable=how_to_enable, auto=auto,
                   ops=tuple(f"{namespace}::{n}" for n in names), namespace=namespace)


_REGISTRY: dict[str, Backend] = {}

# Debug hook: the path a call took, for backends that choose one per call (fast: "reordered",
# "naive", "sorted"; cpu: whether the scores were kept for the backward). Process-global and
# not thread-safe (a debugging and benchmarking aid).
_last_path: Optional[str] = None
_records: Optional[list] = None


def last_path() -> Optional[str]:
    """The path taken by the most recent call that noted one (None before the first)."""
    return _last_path


@contextlib.contextmanager
def record_paths() -> Iterator[list]:
    """Collect (mode, path) for every call that notes its path inside the ``with`` block."""
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


def note_path(mode: str, path: str) -> None:
    global _last_path
    _last_path = path
    if _records is not None:
        _records.append((mode, path))


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"backend {backend.name!r} is already registered")
    for f in backend.families + backend.double_backward:
        if f not in FAMILIES:
            raise ValueError(f"backend {backend.name!r} declares unknown family {f!r}")
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
            "auto": b.auto if isinstance(b.auto, bool) else list(b.auto),
            "priority": b.priority,
            "double_backward": list(b.double_backward),
            "deterministic": (b.deterministic if isinstance(b.deterministic, bool)
                              else list(b.deterministic)),
            "ops": list(b.ops),
            "description": b.description,
        })
    return out


def select(name: str, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
           mode: str) -> Backend:
    """The backend that runs this call (validated 3-D tensors); raises ValueError/RuntimeError
    with the reason."""
    dtype, device_type = theta.dtype, theta.device.type

    def refusal(b: Backend) -> Optional[str]:
        reason = b.check_call(mode, dtype, device_type)
        if reason is None and b.accepts is not None:
            reason = b.accepts(theta, phi, g, mode)
        return reason

    if name != "auto":
        b = get(name)
        reason = b.unavailable_reason()
        if reason is not None:
            hint = f" {b.how_to_enable}" if b.how_to_enable else ""
            raise RuntimeError(f"backend {name!r} is not available: {reason}.{hint}")
        reason = refusal(b)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return b
    refusals = []
    for n in names():
        b = _REGISTRY[n]
        if not b.auto_on(device_type):
            continue
        reason = b.unavailable_reason() or refusal(b)
        if reason is None:
            return b
        refusals.append(f"{n}: {reason}")
    raise ValueError("backend='auto' found no backend for mode "
                     f"{mode!r}, dtype {dtype}, device {device_type}: " + "; ".join(refusals))
