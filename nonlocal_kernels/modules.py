"""Drop-in Non-local blocks with mmcv's ``_NonLocalNd`` semantics and state-dict keys.

    z = x + conv_out(y),   y = nonlocal_attention(theta(x), phi(x), g(x))

Keys (so mmcv checkpoints load unchanged): ``g.conv.*``, ``theta.conv.*``, ``phi.conv.*``
(``g.0.conv.*`` / ``phi.0.conv.*`` when sub-sampling after the conv), ``conv_out.conv.*``,
``conv_out.bn.*`` and ``concat_project.conv.weight``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import modes as _modes
from .functional import autocast_enabled, nonlocal_attention

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d((2, 2)),
         3: lambda: nn.MaxPool3d((1, 2, 2))}  # space only, never time


class _ConvModule(nn.Module):
    """A 1x1 conv with an optional batch norm, named like mmcv's ConvModule (conv, bn)."""

    def __init__(self, dim: int, cin: int, cout: int, bias: bool = True, norm: bool = False):
        super().__init__()
        self.conv = _CONV[dim](cin, cout, kernel_size=1, bias=bias)
        self.bn = _BN[dim](cout) if norm else None

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(n, C, *spatial) -> (n, P, C) channels-first view, no copy."""
    return t.flatten(2).transpose(1, 2)


class NonLocalBlock(nn.Module):
    """Non-local block over 1-D, 2-D or 3-D inputs (``dim``), input (n, C, *spatial).

    Args (mmcv names): ``in_channels``; ``reduction=2`` (inter_channels = max(C // reduction, 1));
    ``use_scale=True`` (divide theta.phi by sqrt(inter_channels), embedded_gaussian only);
    ``sub_sample=False`` (max-pool phi and g by 2 over space only); ``mode`` one of
    embedded_gaussian, gaussian, dot_product, concatenation; ``norm=None`` or ``"bn"`` (batch
    norm after conv_out); ``zeros_init=True`` (a fresh block is the identity).
    Extensions: ``inter_channels`` overrides reduction; ``pool_before_conv=True`` pools x before
    the phi/g convs (Caffe2/SlowFast order, cheaper); ``scale`` (float) overrides the softmax
    scale; ``backend`` is passed to :func:`nonlocal_attention`.
    """

    def __init__(self, in_channels: int, dim: int = 2, reduction: int = 2, use_scale: bool = True,
                 sub_sample: bool = False, mode: str = "embedded_gaussian",
                 norm: Optional[str] = None, zeros_init: bool = True,
                 inter_channels: Optional[int] = None, pool_before_conv: bool = False,
                 scale: Optional[float] = None, backend: str = "auto", std: float = 0.01):
        super().__init__()
        if dim not in _CONV:
            raise ValueError(f"dim: expected 1, 2 or 3, got {dim!r}")
        m = _modes.get(mode)
        if norm not in (None, "bn"):
            raise ValueError(f"norm: expected None or 'bn', got {norm!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
        if inter_channels is None:
            if not isinstance(reduction, int) or reduction < 1:
                raise ValueError(f"reduction: expected a positive int, got {reduction!r}")
            inter_channels = max(in_channels // reduction, 1)
        elif not isinstance(inter_channels, int) or inter_channels < 1:
            raise ValueError(f"inter_channels: expected a positive int, got {inter_channels!r}")
        if scale is not None and not m.takes_scale:
            raise ValueError(f"scale: applies to the softmax modes only, not {mode!r}")
        if pool_before_conv and not sub_sample:
            raise ValueError("pool_before_conv: needs sub_sample=True")

        self.dim = dim
        self.in_channels = in_channels
        self.reduction = reduction
        self.inter_channels = inter_channels
        self.use_scale = use_scale
        self.sub_sample = sub_sample
        self.mode = mode
        self.norm = norm
        self.pool_before_conv = pool_before_conv
        self.backend = backend
        if scale is not None:
            self.scale = float(scale)
        elif mode == "embedded_gaussian" and use_scale:
            self.scale = 1.0 / math.sqrt(inter_channels)
        else:
            self.scale = 1.0 if m.takes_scale else None

        self.g = _ConvModule(dim, in_channels, inter_channels)
        self.conv_out = _ConvModule(dim, inter_channels, in_channels, bias=norm is None,
                                    norm=norm == "bn")
        if mode != "gaussian":
            self.theta = _ConvModule(dim, in_channels, inter_channels)
            self.phi = _ConvModule(dim, in_channels, inter_channels)
        if m.takes_concat_weight:
            self.concat_project = _ConvModule(2, inter_channels * 2, 1, bias=False)
        # Pooling after the conv lives inside g / phi (mmcv's keys g.0.conv.*, phi.0.conv.*).
        self.pool = _POOL[dim]() if pool_before_conv else None
        if sub_sample and not pool_before_conv:
            self.g = nn.Sequential(self.g, _POOL[dim]())
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, _POOL[dim]())
            else:
                self.phi = _POOL[dim]()
        self.init_weights(std=std, zeros_init=zeros_init)

    def _conv_modules(self):
        for name in ("g", "theta", "phi"):
            m = getattr(self, name, None)
            if isinstance(m, nn.Sequential):
                m = m[0]
            if isinstance(m, _ConvModule):
                yield m

    def init_weights(self, std: float = 0.01, zeros_init: bool = True) -> None:
        """mmcv's init: theta/phi/g convs normal(std); conv_out (or its bn) zero if zeros_init."""
        for m in self._conv_modules():
            nn.init.normal_(m.conv.weight, 0.0, std)
            nn.init.zeros_(m.conv.bias)
        out = self.conv_out.bn if self.conv_out.bn is not None else self.conv_out.conv
        if zeros_init:
            nn.init.zeros_(out.weight)
        else:
            nn.init.normal_(out.weight, 0.0, std)
        if out.bias is not None:
            nn.init.zeros_(out.bias)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"mode={self.mode!r}, sub_sample={self.sub_sample}, "
                f"pool_before_conv={self.pool_before_conv}, scale={self.scale}, "
                f"backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dim + 2:
            raise ValueError(f"x: expected a {self.dim + 2}-D input (n, C, "
                             f"{', '.join('THW'[3 - self.dim:])}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels, got shape "
                             f"{tuple(x.shape)}")
        if self.sub_sample:
            small = [s for s in x.shape[-min(self.dim, 2):] if s < 2]
            if small:
                raise ValueError(f"x: sub_sample pools space by 2, so every spatial size must "
                                 f"be >= 2; got shape {tuple(x.shape)}")
        kv_in = self.pool(x) if self.pool is not None else x
        g = self.g(kv_in)
        if self.mode == "gaussian":  # theta = x, phi = x (pooled when sub-sampling)
            theta = x
            phi = self.phi(x) if self.sub_sample and self.pool is None else kv_in
        else:
            theta, phi = self.theta(x), self.phi(kv_in)
        theta, phi, g = _positions(theta), _positions(phi), _positions(g)
        concat_weight = None
        if _modes.get(self.mode).takes_concat_weight:
            concat_weight = self.concat_project.conv.weight.reshape(-1)
        # Under autocast the convs give the autocast dtype while x (gaussian theta) and the
        # concat weight stay float32: run the attention in one dtype.
        device = x.device.type
        autocasting = autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocasting else g.dtype
        theta, phi, g = theta.to(dtype), phi.to(dtype), g.to(dtype)
        if concat_weight is not None:
            concat_weight = concat_weight.to(dtype)
        y = nonlocal_attention(theta, phi, g, mode=self.mode, scale=self.scale,
                               concat_weight=concat_weight, backend=self.backend)
        # (n, N, C') -> (n, C', *spatial): a view, no copy.
        y = y.transpose(1, 2).reshape((x.shape[0], self.inter_channels) + tuple(x.shape[2:]))
        return x + self.conv_out(y)


class NonLocal1d(NonLocalBlock):
    """Non-local block over (n, C, L). See :class:`NonLocalBlock`."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, dim=1, **kwargs)


class NonLocal2d(NonLocalBlock):
    """Non-local block over (n, C, H, W). See :class:`NonLocalBlock`."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, dim=2, **kwargs)


class NonLocal3d(NonLocalBlock):
    """Non-local block over (n, C, T, H, W); sub-sampling pools H and W only."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, dim=3, **kwargs)
