"""Backend ``sdpa``: the softmax family through PyTorch's own fused attention kernels.

The ops ``nonlocal_kernels_sdpa::softmax_fwd`` / ``softmax_bwd`` (the softmax schema of
ops.SOFTMAX_SCHEMAS, run through ops.SoftmaxAttention like every softmax backend) call the ATen
ops behind ``torch.nn.functional.scaled_dot_product_attention`` by name, on (B, 1, L, d) views of
the (B, L, d) inputs (one head):

- CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (float64,
  float32, float16, bfloat16; lse in float64 for float64 inputs, else float32);
- CUDA: ``aten::_scaled_dot_product_flash_attention`` and its ``_backward`` (FlashAttention-2:
  float16 and bfloat16, sm_80 or newer, head dims up to 256).

Both forwards return the log-sum-exp, so ``return_lse`` costs nothing, and both backwards take
it. The memory-efficient and cuDNN kernels are not wrapped (the benchmarks still time them as
baselines): their lse comes padded or in another layout, and none of the three has run here.

What the kernels need, and how the ops give it to them:

- A unit stride on the last dim. The kernels read the other dims through their strides, but
  ignore the last one: on CPU, a channels-first query (stride N on its last dim) gave a wrong
  output with no error (torch 2.14). So each operand whose last-dim stride is not 1 (the
  modules' channels-first views) is copied once, contiguously; every other layout goes as it is.
- Equal head dims for q, k and v, a multiple of 8 on CUDA. The ops pad with zero columns where
  they differ (exact: a zero column of theta and phi adds nothing to a score, one of g gives a
  zero column of y, sliced off), as SDPA itself pads CUDA head dims to a multiple of 8. The
  backend's ``accepts`` only lets calls with dk == dv through, so padding is there for the
  gradient into lse: ops.softmax_grads appends a column to g, y and dy, and the backward pads
  theta and phi by one column to match.

Gradients come back laid out like their inputs (the op contract: empty_like), which for a
channels-first input costs one copy. Second derivatives are refused (``double_backward`` is
empty: the fused backwards have no derivative). FlashAttention-2's CUDA backward accumulates dq
with atomics, so on CUDA two runs may differ in the last bits (``deterministic=("cpu",)``).

``auto`` takes this backend on CUDA only, where ``accepts`` lets a call through: float16 or
bfloat16, dk == dv <= 256 (the head dims that PyTorch's flash kernel runs); ``triton`` takes the
rest. The rule is ``accepts`` below, and nothing else decides it. On CPU ``auto`` keeps ``cpu``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..modes import FLOAT_DTYPES
from .registry import Backend, register

NAMESPACE = "nonlocal_kernels_sdpa"
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 256  # FlashAttention-2's largest head dim in PyTorch
CUDA_HEAD_DIM_MULTIPLE = 8  # its head dims are multiples of 8 (SDPA pads to that)
_A = torch.ops.aten
# Whether this torch has the CUDA flash kernel, decided once (a build flag, no CUDA call): some
# builds lack it, and ROCm's flash kernel (AOTriton) is another kernel, never checked here.
_CUDA_FLASH = (torch.version.hip is None and
               getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)())


def _width(device: torch.device, *dims: int) -> int:
    """The one head dim the kernel gets: the largest of dims, rounded up to a multiple of 8 on
    CUDA."""
    w = max(dims)
    if device.type == "cuda":
        w = -(-w // CUDA_HEAD_DIM_MULTIPLE) * CUDA_HEAD_DIM_MULTIPLE
        if w > CUDA_MAX_HEAD_DIM:
            raise RuntimeError(
                f"backend 'sdpa': PyTorch's flash kernel takes head dims up to "
                f"{CUDA_MAX_HEAD_DIM}, and this call needs {w} (head dims {dims}; a gradient "
                f"into lse adds one column to dv). Use backend='triton' (or 'cuda'), which take "
                f"any head dims.")
    return w


def _operand(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, d) -> (B, 1, L, width) with a unit stride on the last dim: zero-padded when
    d < width, copied when the last-dim stride is not 1, else a view."""
    if t.shape[-1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    elif t.stride(-1) != 1:
        t = t.contiguous()
    return t.unsqueeze(1)


def _like(x: torch.Tensor, grad4: torch.Tensor) -> torch.Tensor:
    """The kernel's (B, 1, L, width) gradient of x as x's (B, L, d), laid out like x."""
    grad = grad4[:, 0, :, :x.shape[-1]]
    out = torch.empty_like(x)
    if out.stride() == grad.stride():
        return grad
    return out.copy_(grad)


def _cuda_device_ok(device: torch.device) -> bool:
    # Read once per device, outside any trace (torch.compile runs backend selection).
    return _sm80_or_newer(device.index if device.index is not None
                          else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _sm80_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _softmax_fwd(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, dk = theta.shape
    dv = g.shape[-1]
    width = _width(theta.device, dk, dv)
    q, k, v = (_operand(t, width) for t in (theta, phi, g))
    if theta.device.type == "cuda":
        out, lse = _A._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                          scale=scale)[:2]
    else:
        out, lse = _A._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                  scale=scale)
    if tuple(lse.shape) != (B, 1, N):
        raise RuntimeError(f"backend 'sdpa': this torch's flash kernel returned lse of shape "
                           f"{tuple(lse.shape)}, expected {(B, 1, N)}; use another backend")
    y = out[:, 0, :, :dv]
    return y.contiguous(), lse[:, 0].to(ops.lse_dtype(theta.dtype)).contiguous()


def _softmax_bwd(dy: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                 y: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, M = theta.shape[1], phi.shape[1]
    width = _width(theta.device, theta.shape[-1], g.shape[-1])
    q, k, v, out, do = (_operand(t, width) for t in (theta, phi, g, y, dy))
    lse4 = lse.unsqueeze(1).contiguous()
    if theta.device.type == "cuda":
        # Dense inputs: no cumulative sequence lengths (None: undefined tensors). No dropout:
        # the philox state is not read; it has the forward's form (rng_state: 2 uint64,
        # unused: empty).
        rng_state = torch.zeros(2, dtype=torch.uint64, device=theta.device)
        unused = torch.empty(0, dtype=torch.uint64, device=theta.device)
        dq, dk, dv = _A._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse4, None, None, N, M, 0.0, False, rng_state, unused,
            scale=scale)
    else:
        dq, dk, dv = _A._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse4, 0.0, False, scale=scale)
    return _like(theta, dq), _like(phi, dk), _like(g, dv)


def _accepts(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, mode: str) -> Optional[str]:
    """None when PyTorch's flash kernel runs this call as it is; else why not. This is the
    whole rule for where ``auto`` takes sdpa (on CUDA) instead of triton."""
    dk, dv = theta.shape[-1], g.shape[-1]
    if dk != dv:
        return (f"g: dv = {dv} differs from dk = {dk}, and PyTorch's flash kernels take equal "
                f"head dims (backend 'cpu', 'cuda' or 'triton' take any)")
    if theta.device.type != "cuda":
        return None
    if not _CUDA_FLASH:
        return ("theta: on CUDA this torch build has no flash attention kernel (or it is ROCm's, "
                "not checked here); backend 'triton' or 'cuda' run the call")
    if theta.dtype not in CUDA_DTYPES:
        return (f"theta: dtype {str(theta.dtype).replace('torch.', '')} on CUDA; PyTorch's "
                f"flash kernel takes float16 and bfloat16 only (backend 'triton' or 'cuda' "
                f"take float32)")
    if dk > CUDA_MAX_HEAD_DIM:
        return (f"theta: dk = {dk} > {CUDA_MAX_HEAD_DIM}, the largest head dim of PyTorch's "
                f"flash kernel on CUDA (backend 'triton' or 'cuda' take any)")
    if not _cuda_device_ok(theta.device):
        return f"theta: device {theta.device} is older than sm_80, which flash attention needs"
    return None


def _not_loaded() -> Optional[str]:
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward"):
        if not hasattr(_A, name):
            return f"this torch ({torch.__version__}) has no aten::{name}"
    return None


_NOT_LOADED = _not_loaded()
if _NOT_LOADED is None:
    for _name, _impl in (("softmax_fwd", _softmax_fwd), ("softmax_bwd", _softmax_bwd)):
        torch.library.custom_op(f"{NAMESPACE}::{_name}", _impl, mutates_args=(),
                                device_types=("cpu", "cuda"), schema=ops.SOFTMAX_SCHEMAS[_name])
    ops.register_softmax_ops(NAMESPACE)

BACKEND = register(Backend(
    name="sdpa",
    description="PyTorch's fused SDPA kernels (flash: CPU, and CUDA for float16/bfloat16 with "
                "dk == dv <= 256), lse from the kernels",
    families=("softmax",),
    dtypes=FLOAT_DTYPES,
    devices=("cpu", "cuda"),
    run=ops.softmax_runner("sdpa", NAMESPACE),
    priority=150,
    unavailable_reason=lambda: _NOT_LOADED,
    how_to_enable="Install torch >= 2.6.",
    auto=("cuda",),
    accepts=_accepts,
    deterministic=("cpu",),
    ops=(f"{NAMESPACE}::softmax_fwd", f"{NAMESPACE}::softmax_bwd"),
    namespace=NAMESPACE,
))
