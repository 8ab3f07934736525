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

from . import distributed as _distributed
from . import modes as _modes
from .functional import autocast_enabled, nonlocal_attention

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d((2, 2)),
         3: lambda: nn.MaxPool3d((1, 2, 2))}  # space only, never time


class _ConvModule(nn.Module):
    """A 1x1 conv with an optional batch norm, named like mmcv's ConvModule (conv, bn)."""

    def __init__(self, dim: int, cin: int, cout: int, bias: bool = True,
                 norm: Optional[dict] = None):
        super().__init__()
        self.conv = _CONV[dim](cin, cout, kernel_size=1, bias=bias)
        self.bn = None
        if norm is not None:
            layer = nn.SyncBatchNorm if norm["sync"] else _BN[dim]
            self.bn = layer(cout, eps=norm["eps"], momentum=norm["momentum"])
            self.bn.requires_grad_(norm["requires_grad"])

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


_MMCV_BN = ("BN", "BN1d", "BN2d", "BN3d", "SyncBN")


def _norm_from_cfg(norm: Optional[str], norm_cfg: Optional[dict], dim: int) -> Optional[dict]:
    """The batch norm after conv_out, from ``norm`` ("bn" or None) or an mmcv ``norm_cfg``
    (dict(type='BN3d', requires_grad=True, eps=..., momentum=...); 'BN', 'BN1d/2d/3d' and
    'SyncBN', which mmcv also names ``bn``). None: no norm."""
    if norm not in (None, "bn"):
        raise ValueError(f"norm: expected None or 'bn', got {norm!r}")
    if norm_cfg is None:
        return None if norm is None else {"sync": False, "eps": 1e-5, "momentum": 0.1,
                                          "requires_grad": True}
    if norm is not None:
        raise ValueError("norm, norm_cfg: give one of them (norm_cfg is mmcv's form of norm)")
    if not isinstance(norm_cfg, dict) or norm_cfg.get("type") not in _MMCV_BN:
        raise ValueError(f"norm_cfg: expected a dict with type one of {', '.join(_MMCV_BN)} "
                         f"(mmcv's batch norms), got {norm_cfg!r}")
    kind = norm_cfg["type"]
    if kind[-2:] in ("1d", "2d", "3d") and kind != f"BN{dim}d":
        raise ValueError(f"norm_cfg: type {kind!r} does not match a {dim}-D block "
                         f"(expected 'BN{dim}d', 'BN' or 'SyncBN')")
    unknown = set(norm_cfg) - {"type", "requires_grad", "eps", "momentum"}
    if unknown:
        raise ValueError(f"norm_cfg: unsupported keys {sorted(unknown)} (supported: type, "
                         f"requires_grad, eps, momentum)")
    return {"sync": kind == "SyncBN", "eps": norm_cfg.get("eps", 1e-5),
            "momentum": norm_cfg.get("momentum", 0.1),
            "requires_grad": norm_cfg.get("requires_grad", True)}


def _check_conv_cfg(conv_cfg: Optional[dict], dim: int) -> None:
    """mmcv's ``conv_cfg``: only the plain convolution of the block's dimension is supported."""
    if conv_cfg is None:
        return
    kinds = ("Conv", f"Conv{dim}d")
    if not isinstance(conv_cfg, dict) or conv_cfg.get("type") not in kinds or len(conv_cfg) > 1:
        raise ValueError(f"conv_cfg: expected dict(type=...) with type one of "
                         f"{', '.join(kinds)} for a {dim}-D block, got {conv_cfg!r}")


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fusable(conv) -> bool:
    """A plain 1x1 convolution (any dim) that no hook watches: one GEMM can stand in for it."""
    return (type(conv) in _PLAIN_CONVS and conv.groups == 1
            and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
            and all(p == 0 for p in conv.padding) and not conv._forward_hooks
            and not conv._forward_pre_hooks and not conv._backward_hooks)


def _conv_parts(m: nn.Module):
    """(conv, [modules after it]) when ``m`` computes a fusable conv followed by those modules
    (a plain conv; a conv wrapper, ours or mmcv's ConvModule, with nothing but the conv; an
    nn.Sequential of such a wrapper and pools), else None."""
    if _fusable(m):
        return m, []
    if isinstance(m, nn.Sequential) and len(m) > 0:
        first = _conv_parts(m[0])
        if first is None or first[1] or not all(isinstance(t, nn.modules.pooling._MaxPoolNd)
                                                for t in m[1:]):
            return None
        return first[0], list(m[1:])
    conv = getattr(m, "conv", None)
    if conv is None or not _fusable(conv) or m._forward_hooks or m._forward_pre_hooks:
        return None
    if isinstance(m, _ConvModule) and m.bn is None:
        return conv, []
    mmcv_plain = (type(m).__name__ == "ConvModule" and not getattr(m, "with_norm", True)
                  and not getattr(m, "with_activation", True)
                  and not getattr(m, "with_explicit_padding", True))
    return (conv, []) if mmcv_plain else None


def project(x: torch.Tensor, modules: list) -> list:
    """[m(x) for m in modules] for projections of x (1x1 convs, possibly wrapped and followed by
    max-pools: _conv_parts), with the convs as one GEMM when there are two or more: x is read
    once, (sum C_out, C) times (C, positions) per batch element with the weights concatenated,
    each conv's output a slice of the product, then its pools (whole blocks' time and memory:
    benchmarks/results/blocks-2026-11-30.md). Modules that are anything else run as they
    are."""
    parts = [_conv_parts(m) for m in modules]
    if len(modules) < 2 or any(p is None or p[0].in_channels != x.shape[1]
                               or p[0].weight.dim() != x.dim() for p in parts):
        return [m(x) for m in modules]
    convs = [p[0] for p in parts]
    weight = torch.cat([c.weight.reshape(c.out_channels, -1) for c in convs])
    out = torch.matmul(weight, x.flatten(2))  # (n, sum C_out, positions)
    if any(c.bias is not None for c in convs):
        bias = torch.cat([c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels)
                          for c in convs])
        out = out + bias.to(out.dtype)[:, None]
    results = []
    for t, (conv, after) in zip(out.split([c.out_channels for c in convs], dim=1), parts):
        t = t.view((x.shape[0], t.shape[1]) + tuple(x.shape[2:]))
        for m in after:
            t = m(t)
        results.append(t)
    return results


def _one_more_frame(t: torch.Tensor) -> torch.Tensor:
    """t (n, C, T, ...) with a zero frame appended along dim 2. PyTorch's conv and pool layers
    refuse an input without frames, which a rank of a context-parallel group holds when the
    clip has fewer frames than the group has ranks: its layers run on one zero frame, of which
    nothing is kept. (Appended to t, so that t's graph stays connected: that rank's backward
    must still reach the group's collectives.)"""
    return torch.cat([t, t.new_zeros(t.shape[:2] + (1,) + t.shape[3:])], 2)


class _Shared:
    """A process group held by a module: a deep copy of the module (an EMA copy, say) shares it,
    since a group is a handle on this process's communicators, not data."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(n, C, *spatial) -> (n, P, C) channels-first view, no copy."""
    return t.flatten(2).transpose(1, 2)


def block_attention(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, *, mode: str,
                    scale: Optional[float], concat_weight: Optional[torch.Tensor],
                    backend: str, group=None) -> torch.Tensor:
    """A block's attention on its (n, C, *spatial) feature maps: theta over the query
    positions, phi and g over the (possibly pooled) key positions -> y (n, C_g, *spatial of
    theta), channels-first views in and out (no copies). Under autocast the convs give the
    autocast dtype while x (a Gaussian theta) and a concat weight stay float32: the attention
    runs in one dtype, the autocast one. ``group``: nonlocal_attention's (this rank's slab)."""
    device = theta.device.type
    dtype = torch.get_autocast_dtype(device) if autocast_enabled(device) else g.dtype
    y = nonlocal_attention(_positions(theta).to(dtype), _positions(phi).to(dtype),
                           _positions(g).to(dtype), mode=mode, scale=scale,
                           concat_weight=None if concat_weight is None
                           else concat_weight.to(dtype), backend=backend, group=group)
    # (n, N, C') -> (n, C', *spatial): a view, no copy.
    return y.transpose(1, 2).reshape((theta.shape[0], y.shape[2]) + tuple(theta.shape[2:]))


class NonLocalBlock(nn.Module):
    """Non-local block over 1-D, 2-D or 3-D inputs (``dim``), input (n, C, *spatial).

    Args (mmcv names): ``in_channels``; ``reduction=2`` (inter_channels = max(C // reduction, 1));
    ``use_scale=True`` (divide theta.phi by sqrt(inter_channels), embedded_gaussian only);
    ``sub_sample=False`` (max-pool phi and g by 2 over space only); ``mode`` one of
    embedded_gaussian, gaussian, dot_product, concatenation; ``norm=None`` or ``"bn"`` (batch
    norm after conv_out); ``zeros_init=True`` (a fresh block is the identity).
    mmcv's configuration dicts work too, so an mmaction2 ``non_local_cfg`` passes through:
    ``norm_cfg`` (dict(type='BN3d', requires_grad=True), any of 'BN', 'BN1d/2d/3d', 'SyncBN',
    with eps and momentum), ``conv_cfg`` (dict(type='Conv3d'), the block's own conv only).
    Extensions: ``inter_channels`` overrides reduction; ``pool_before_conv=True`` pools x before
    the phi/g convs (Caffe2/SlowFast order, cheaper); ``scale`` (float) overrides the softmax
    scale; ``backend`` is passed to :func:`nonlocal_attention`.

    ``cp_group`` (a torch.distributed process group): context parallelism. Each rank of the
    group passes its slab of the clip, split along the first dim after the channels
    (NonLocal3d: frames, (n, C, T_r, H, W), see distributed.shard_frames); the block attends
    over the whole clip and returns this rank's slab of the output. The 1x1 convs and the
    spatial max-pool are local; batch norm in training uses the statistics of the whole clip
    (distributed.batch_norm; a SyncBatchNorm those of its own group). Every rank must call
    forward and backward together. Parameter gradients are each rank's share: all-reduce
    them over the group (DDP over it does).
    """

    def __init__(self, in_channels: int, dim: int = 2, reduction: int = 2, use_scale: bool = True,
                 sub_sample: bool = False, mode: str = "embedded_gaussian",
                 norm: Optional[str] = None, zeros_init: bool = True,
                 inter_channels: Optional[int] = None, pool_before_conv: bool = False,
                 scale: Optional[float] = None, backend: str = "auto", std: float = 0.01,
                 norm_cfg: Optional[dict] = None, conv_cfg: Optional[dict] = None,
                 cp_group=None):
        super().__init__()
        if dim not in _CONV:
            raise ValueError(f"dim: expected 1, 2 or 3, got {dim!r}")
        m = _modes.get(mode)
        norm_layer = _norm_from_cfg(norm, norm_cfg, dim)
        _check_conv_cfg(conv_cfg, dim)
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
        if cp_group is not None and sub_sample and dim < 3:
            raise ValueError("cp_group: with sub_sample, a 1-D or 2-D block pools the dim the "
                             "group splits; only NonLocal3d (it pools H and W, never T) can be "
                             "sub-sampled under context parallelism")

        self.dim = dim
        self.in_channels = in_channels
        self.reduction = reduction
        self.inter_channels = inter_channels
        self.use_scale = use_scale
        self.sub_sample = sub_sample
        self.mode = mode
        self.norm = None if norm_layer is None else "bn"
        self.pool_before_conv = pool_before_conv
        self.backend = backend
        self.cp_group = cp_group
        if scale is not None:
            self.scale = float(scale)
        elif mode == "embedded_gaussian" and use_scale:
            self.scale = 1.0 / math.sqrt(inter_channels)
        else:
            self.scale = 1.0 if m.takes_scale else None

        self.g = _ConvModule(dim, in_channels, inter_channels)
        self.conv_out = _ConvModule(dim, inter_channels, in_channels, bias=norm_layer is None,
                                    norm=norm_layer)
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

    @property
    def cp_group(self):
        """The context-parallel process group (None: the whole clip is here)."""
        return self._cp_group.value

    @cp_group.setter
    def cp_group(self, group):
        self._cp_group = _Shared(group)

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
        if self.cp_group is None:
            return self._forward(x)
        # Every rank must reach the attention's collectives: an error before them (a bad input,
        # a local layer) is reported to the whole group, which then raises on every rank.
        with _distributed.report_errors(self.cp_group):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
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
        no_frames = self.cp_group is not None and x.shape[2] == 0
        xs = _one_more_frame(x) if no_frames else x
        kv_in = self.pool(xs) if self.pool is not None else xs
        if self.mode == "gaussian":  # theta = x, phi = x (pooled when sub-sampling)
            theta, g = xs, self.g(kv_in)
            phi = self.phi(xs) if self.sub_sample and self.pool is None else kv_in
        elif self.pool is None:
            theta, phi, g = project(xs, [self.theta, self.phi, self.g])
        else:
            theta, (phi, g) = self.theta(xs), project(kv_in, [self.phi, self.g])
        if no_frames:  # keep no position of the zero frame
            theta, phi, g = (t[:, :, :0] for t in (theta, phi, g))
        concat_weight = None
        if _modes.get(self.mode).takes_concat_weight:
            concat_weight = self.concat_project.conv.weight.reshape(-1)
        y = block_attention(theta, phi, g, mode=self.mode, scale=self.scale,
                            concat_weight=concat_weight, backend=self.backend,
                            group=self.cp_group)
        return x + self._conv_out(y)

    def _conv_out(self, y: torch.Tensor) -> torch.Tensor:
        if self.cp_group is None:
            return self.conv_out(y)
        # Its layers in order; a batch norm takes the statistics of the whole clip (a
        # SyncBatchNorm those of its own group, which holds the clip's ranks and maybe more).
        for layer in self.conv_out.children():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                group = self.cp_group
                if isinstance(layer, nn.SyncBatchNorm):
                    group = layer.process_group or torch.distributed.group.WORLD
                y = _distributed.batch_norm(y, layer, group)
            elif isinstance(layer, (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                    nn.modules.instancenorm._InstanceNorm)):
                raise ValueError(f"cp_group: {type(layer).__name__} after conv_out normalises "
                                 f"over positions that other ranks hold; under context "
                                 f"parallelism only batch norm is synchronised")
            elif y.shape[2] == 0:  # a rank without frames
                y = layer(_one_more_frame(y))[:, :, :0]
            else:
                y = layer(y)
        return y


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
