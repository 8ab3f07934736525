"""Methods a benchmark can run: every registered backend of nonlocal_kernels plus baselines.

A method is ``fn(theta, phi, g, concat_weight, mode, scale) -> y``. ``naive`` is the reference
backend (materialises N x M). ``torch_sdpa`` is torch.nn.functional.scaled_dot_product_attention
with its default dispatch; ``torch_sdpa_flash`` and ``torch_sdpa_math`` force its flash (CPU and
CUDA) or math kernel, and on CUDA ``torch_sdpa_efficient`` and ``torch_sdpa_cudnn`` the other
two. (The backend ``sdpa`` is this package's wrapper of the flash kernels, with lse.) Other
baselines are added to BASELINES.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import nonlocal_kernels
from nonlocal_kernels.modes import SOFTMAX_MODES


def _backend_method(name: str) -> Callable:
    def run(theta, phi, g, concat_weight, mode, scale):
        return nonlocal_kernels.nonlocal_attention(theta, phi, g, mode=mode, scale=scale,
                                                   concat_weight=concat_weight, backend=name)
    return run


def _sdpa_operand(t: torch.Tensor) -> torch.Tensor:
    """(B, L, d) as SDPA's fused kernels take it: (B, heads = 1, L, d) with a unit stride on the
    last dim. They refuse 3-D inputs on CUDA ("Both fused kernels requires query, key and value
    to be 4 dimensional") and, on CPU and CUDA, a last dim with another stride ("All fused
    kernels require the last dimension of the input to have stride 1"), as the benchmark's
    channels-first inputs have; either sent every shape of the first H200 run to the math
    kernel, or to "No available kernel" when forced. The copy a channels-first input needs is
    timed with the call: a caller pays it too."""
    return (t if t.stride(-1) == 1 else t.contiguous()).unsqueeze(1)


def _sdpa_method(sdpa_backend: Optional[str]) -> Callable:
    def run(theta, phi, g, concat_weight, mode, scale):
        if sdpa_backend is None:
            ctx = contextlib.nullcontext()
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel([getattr(SDPBackend, sdpa_backend)])
        with ctx:
            q, k, v = (_sdpa_operand(t) for t in (theta, phi, g))
            return F.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0]
    return run


def _mmcv_concat(theta, phi, g, concat_weight, mode, scale):
    """mmcv's _NonLocalNd.concatenation (also AlexHex7's): repeat theta over keys and phi over
    queries, concatenate into a (B, 2 dk, N, M) tensor, a bias-free 1x1 conv to one channel
    (concat_project) with ReLU, divide by M, multiply by g."""
    B, N, dk = theta.shape
    M = phi.shape[1]
    t = theta.transpose(1, 2).unsqueeze(3).repeat(1, 1, 1, M)  # (B, dk, N, M)
    p = phi.transpose(1, 2).unsqueeze(2).repeat(1, 1, N, 1)  # (B, dk, N, M)
    feat = torch.cat([t, p], dim=1)  # (B, 2 dk, N, M)
    pairwise = F.relu(F.conv2d(feat, concat_weight.view(1, 2 * dk, 1, 1)))  # (B, 1, N, M)
    pairwise = pairwise.view(B, N, M) / M
    return pairwise @ g


def _fast_pytorch(theta, phi, g, concat_weight, mode, scale):
    """Backend fast with its fused C++ CPU concatenation kernels switched off: the pure-PyTorch
    version of the same algorithm (what CUDA tensors and builds without _C run)."""
    from nonlocal_kernels.backends import fast
    with fast.use_compiled_concat(False):
        return nonlocal_kernels.nonlocal_attention(theta, phi, g, mode=mode, scale=scale,
                                                   concat_weight=concat_weight, backend="fast")


def _cpu_tiled(theta, phi, g, concat_weight, mode, scale):
    """Backend cpu on its tiled path at every size (NONLOCAL_KERNELS_CPU_KEEP_MB=0 for the
    call): what it runs above the budget, to compare with its whole-batch path below it."""
    from nonlocal_kernels.backends import cpu
    old = os.environ.get(cpu.KEEP_ENV)
    os.environ[cpu.KEEP_ENV] = "0"
    try:
        return _backend_method("cpu")(theta, phi, g, concat_weight, mode, scale)
    finally:
        if old is None:
            del os.environ[cpu.KEEP_ENV]
        else:
            os.environ[cpu.KEEP_ENV] = old


# name -> (fn, modes it supports, device types, description)
BASELINES: dict = {
    "naive": (_backend_method("reference"), None, ("cpu", "cuda"),
              "reference backend: materialises the N x M affinity"),
    "torch_sdpa": (_sdpa_method(None), SOFTMAX_MODES, ("cpu", "cuda"),
                   "torch scaled_dot_product_attention, default dispatch"),
    "mmcv_concat": (_mmcv_concat, ("concatenation",), ("cpu", "cuda"),
                    "mmcv-style concatenation: builds the (B, 2 dk, N, M) tensor and a 1x1 conv"),
    "fast_pytorch": (_fast_pytorch, ("concatenation",), ("cpu",),
                     "backend fast, concatenation without its fused C++ CPU kernels"),
}
# Methods that run only when named (--backends), never by default.
OPT_IN: dict = {
    "cpu_tiled": (_cpu_tiled, SOFTMAX_MODES, ("cpu",),
                  "backend cpu on its tiled path at every size (budget 0)"),
}
for _name, _sdpa, _devices in (
        ("torch_sdpa_flash", "FLASH_ATTENTION", ("cpu", "cuda")),
        ("torch_sdpa_efficient", "EFFICIENT_ATTENTION", ("cuda",)),
        ("torch_sdpa_cudnn", "CUDNN_ATTENTION", ("cuda",)),
        ("torch_sdpa_math", "MATH", ("cpu", "cuda"))):
    BASELINES[_name] = (_sdpa_method(_sdpa), SOFTMAX_MODES, _devices,
                        f"torch SDPA forced to {_sdpa}")


def default_methods(mode: str, device_type: str) -> list[str]:
    """Every available backend (except the reference, which is 'naive') plus the baselines."""
    names = []
    for b in nonlocal_kernels.available_backends():
        if (b["available"] and b["auto"] and b["name"] != "reference"
                and mode in b["modes"] and device_type in b["devices"]):
            names.append(b["name"])
    for name, (_, modes, devices, _) in BASELINES.items():
        if (modes is None or mode in modes) and device_type in devices:
            names.append(name)
    return names


def get_method(name: str) -> Callable:
    if name in BASELINES or name in OPT_IN:
        return {**BASELINES, **OPT_IN}[name][0]
    known = {b["name"] for b in nonlocal_kernels.available_backends()}
    if name not in known:
        raise ValueError(f"--backends: unknown method {name!r}; known: "
                         f"{', '.join(sorted(known | set(BASELINES) | set(OPT_IN)))}")
    return _backend_method(name)
