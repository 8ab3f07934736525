"""Methods a benchmark can run: every registered backend of nonlocal_kernels plus baselines.

A method is ``fn(theta, phi, g, concat_weight, mode, scale) -> y``. ``naive`` is the reference
backend (materialises N x M). ``sdpa`` is torch.nn.functional.scaled_dot_product_attention with
its default dispatch; on CUDA also ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn`` and
``sdpa_math``, each forced to that SDPA backend. Other baselines are added to BASELINES.
"""

from __future__ import annotations

import contextlib
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


def _sdpa_method(sdpa_backend: Optional[str]) -> Callable:
    def run(theta, phi, g, concat_weight, mode, scale):
        if sdpa_backend is None:
            ctx = contextlib.nullcontext()
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel([getattr(SDPBackend, sdpa_backend)])
        with ctx:
            return F.scaled_dot_product_attention(theta, phi, g, scale=scale)
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


# name -> (fn, modes it supports, device types, description)
BASELINES: dict = {
    "naive": (_backend_method("reference"), None, ("cpu", "cuda"),
              "reference backend: materialises the N x M affinity"),
    "sdpa": (_sdpa_method(None), SOFTMAX_MODES, ("cpu", "cuda"),
             "torch scaled_dot_product_attention, default dispatch"),
    "mmcv_concat": (_mmcv_concat, ("concatenation",), ("cpu", "cuda"),
                    "mmcv-style concatenation: builds the (B, 2 dk, N, M) tensor and a 1x1 conv"),
    "fast_pytorch": (_fast_pytorch, ("concatenation",), ("cpu",),
                     "backend fast, concatenation without its fused C++ CPU kernels"),
}
for _name, _sdpa in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                     ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH")):
    BASELINES[_name] = (_sdpa_method(_sdpa), SOFTMAX_MODES, ("cuda",),
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
    if name in BASELINES:
        return BASELINES[name][0]
    known = {b["name"] for b in nonlocal_kernels.available_backends()}
    if name not in known:
        raise ValueError(f"--backends: unknown method {name!r}; known: "
                         f"{', '.join(sorted(known | set(BASELINES)))}")
    return _backend_method(name)
