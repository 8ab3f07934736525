"""convert(model): the Non-local blocks of models people already train, on this library's kernels.

    model = nonlocal_kernels.convert(model)          # in place; returns the model

Each supported block is replaced, in its parent, by a :class:`ConvertedNonLocal` that takes over
the block's attributes as they are: its sub-modules, parameters and buffers (the same objects,
under the same names), its hyper-parameters, train/eval mode and hooks. So the state dict (keys
and values), an optimizer's parameters and the BN running statistics stay the block's, and a
checkpoint of the original model loads into the converted one and back. Only the forward
differs: it is the block's own forward with the attention (theta phi^T, the normalisation, the
product with g) computed by :func:`nonlocal_kernels.nonlocal_attention`, so no N x M tensor is
ever formed, forward or backward.

Supported blocks (``SUPPORTED``), recognised by class where the package is on PyPI and by
structure where it is not:

- mmcv ``NonLocal1d/2d/3d`` (``mmcv.cnn.bricks.non_local._NonLocalNd``: every mode, sub_sample,
  norm_cfg, use_scale), and so mmaction2's ``ResNet3d`` / ``ResNetTSM`` with ``non_local``;
- pytorchvideo ``NonLocal`` (``pytorchvideo.layers.nonlocal_net``: softmax and dot_product, with
  any ``pool`` module and any ``norm``);
- timm ``NonLocalAttn`` (``timm.layers.non_local_attn``);
- SlowFast's ``Nonlocal`` (``slowfast/models/nonlocal_helper.py``): a class named ``Nonlocal``
  with conv_theta, conv_phi, conv_g, conv_out, bn, dim_inner, instantiation and use_pool;
- AlexHex7's ``_NonLocalBlockND`` (github.com/AlexHex7/Non-local_pytorch): a class named
  ``_NonLocalBlockND`` with g and W, whose variant is read from its module's file name
  (``non_local_embedded_gaussian``, ``non_local_gaussian``, ``non_local_dot_product``,
  ``non_local_concatenation``: the embedded-Gaussian and dot-product variants have the same
  sub-modules), or from ``concat_project`` (concatenation) and a missing ``theta`` (Gaussian).

A block that looks like one of these but cannot be run faithfully (an unknown variant or
instantiation) is left as it is, working, and named in a warning. Converting twice is harmless:
converted blocks and this library's own ``NonLocalBlock`` are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable, Optional

from torch import nn

from .modules import NonLocalBlock, block_attention, project

log = logging.getLogger("nonlocal_kernels")


# ------------------------------------------------------------------------------------------
# The forwards: each is the peer's forward with the attention through nonlocal_attention
# (modules.block_attention: feature maps in and out, autocast handled as in our own blocks).
# y takes the layout each peer gives it before its output conv (contiguous, except timm's
# reshaped view), so the convs, norms and the block's output see the layouts of the original.
# The theta / phi / g convs that read the same input run as one GEMM (modules.project).
# ------------------------------------------------------------------------------------------
def _mmcv_forward(self, x):
    if self.mode == "gaussian":
        theta, g = x, self.g(x)
        phi = self.phi(x) if self.sub_sample else x
    else:
        theta, phi, g = project(x, [self.theta, self.phi, self.g])
    scale, w = None, None
    if self.mode == "embedded_gaussian":
        scale = theta.shape[1] ** -0.5 if self.use_scale else 1.0
    elif self.mode == "gaussian":
        scale = 1.0
    elif self.mode == "concatenation":
        w = self.concat_project.conv.weight.reshape(-1)
    y = block_attention(theta, phi, g, mode=self.mode, scale=scale, concat_weight=w,
                        backend=self.nonlocal_backend).contiguous()
    return x + self.conv_out(y)


def _mmcv_problem(m) -> Optional[str]:
    if m.mode == "concatenation":
        cp = m.concat_project
        if getattr(cp, "norm_cfg", None) is not None or not isinstance(cp.activate, nn.ReLU):
            return "its concat_project is not a bias-free conv followed by a ReLU"
    return None


def _key_side(self, x, pool):
    """theta from x, phi and g from pool(x) (x when pool is None), projected together where
    they share an input."""
    if pool is None:
        return project(x, [self.conv_theta, self.conv_phi, self.conv_g])
    return [self.conv_theta(x)] + project(pool(x), [self.conv_phi, self.conv_g])


def _pytorchvideo_forward(self, x):
    theta, phi, g = _key_side(self, x, self.pool)
    softmax = self.instantiation == "softmax"
    y = block_attention(theta, phi, g,
                        mode="embedded_gaussian" if softmax else "dot_product",
                        scale=theta.shape[1] ** -0.5 if softmax else None, concat_weight=None,
                        backend=self.nonlocal_backend).contiguous()
    p = self.conv_out(y)
    if self.norm is not None:
        p = self.norm(p)
    return x + p


def _slowfast_forward(self, x):
    theta, phi, g = _key_side(self, x, self.pool if self.use_pool else None)
    softmax = self.instantiation == "softmax"
    y = block_attention(theta, phi, g,
                        mode="embedded_gaussian" if softmax else "dot_product",
                        scale=self.dim_inner ** -0.5 if softmax else None, concat_weight=None,
                        backend=self.nonlocal_backend).contiguous()
    return x + self.bn(self.conv_out(y))


def _instantiation_problem(m) -> Optional[str]:
    if m.instantiation not in ("softmax", "dot_product"):
        return f"instantiation {m.instantiation!r} is neither 'softmax' nor 'dot_product'"
    return None


def _timm_forward(self, x):
    t, p, g = project(x, [self.t, self.p, self.g])
    y = block_attention(t, p, g, mode="embedded_gaussian",
                        scale=self.scale, concat_weight=None, backend=self.nonlocal_backend)
    return self.norm(self.z(y)) + x


_ALEXHEX7_VARIANTS = {
    "non_local_embedded_gaussian": "embedded_gaussian",
    "non_local_gaussian": "gaussian",
    "non_local_dot_product": "dot_product",
    "non_local_concatenation": "concatenation",
}


def _alexhex7_mode(m) -> Optional[str]:
    if hasattr(m, "concat_project"):
        return "concatenation"
    if not hasattr(m, "theta"):
        return "gaussian"
    cls = getattr(m, "original_class", type(m))  # a converted block keeps its original's
    return _ALEXHEX7_VARIANTS.get(cls.__module__.rsplit(".", 1)[-1])


def _alexhex7_forward(self, x, return_nl_map=False):
    if return_nl_map:  # the N x M map itself was asked for: the block's own forward makes it
        return self.original_class.forward(self, x, return_nl_map=True)
    mode = _alexhex7_mode(self)
    if mode == "gaussian":
        theta, g = x, self.g(x)
        phi = self.phi(x) if self.sub_sample else x
    else:
        theta, phi, g = project(x, [self.theta, self.phi, self.g])
    w = self.concat_project[0].weight.reshape(-1) if mode == "concatenation" else None
    y = block_attention(theta, phi, g, mode=mode,
                        scale=1.0 if mode in ("embedded_gaussian", "gaussian") else None,
                        concat_weight=w, backend=self.nonlocal_backend).contiguous()
    return self.W(y) + x


def _alexhex7_problem(m) -> Optional[str]:
    if _alexhex7_mode(m) is None:
        return (f"its variant cannot be told from its sub-modules or its module "
                f"{type(m).__module__!r} (expected a file named one of "
                f"{', '.join(_ALEXHEX7_VARIANTS)})")
    if hasattr(m, "concat_project"):
        cp = m.concat_project
        if not (isinstance(cp, nn.Sequential) and len(cp) == 2 and cp[0].bias is None
                and isinstance(cp[1], nn.ReLU)):
            return "its concat_project is not Sequential(bias-free conv, ReLU)"
    return None


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------
def _isinstance_of(module_name: str, class_name: str) -> Callable[[nn.Module], bool]:
    """A matcher for a class of an optional package (imported only if already imported: a
    model holding such a block has imported it)."""
    def match(m: nn.Module) -> bool:
        import sys
        mod = sys.modules.get(module_name)
        cls = getattr(mod, class_name, None) if mod is not None else None
        return cls is not None and isinstance(m, cls)
    return match


def _has(class_name: str, *attributes: str) -> Callable[[nn.Module], bool]:
    def match(m: nn.Module) -> bool:
        return type(m).__name__ == class_name and all(hasattr(m, a) for a in attributes)
    return match


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    matches: Callable[[nn.Module], bool]
    forward: Callable
    problem: Callable[[nn.Module], Optional[str]] = lambda m: None  # why it cannot convert


SUPPORTED = {p.name: p for p in (
    Peer("mmcv", _isinstance_of("mmcv.cnn.bricks.non_local", "_NonLocalNd"), _mmcv_forward,
         _mmcv_problem),
    Peer("pytorchvideo", _isinstance_of("pytorchvideo.layers.nonlocal_net", "NonLocal"),
         _pytorchvideo_forward, _instantiation_problem),
    Peer("timm", _isinstance_of("timm.layers.non_local_attn", "NonLocalAttn"), _timm_forward),
    Peer("slowfast", _has("Nonlocal", "conv_theta", "conv_phi", "conv_g", "conv_out", "bn",
                          "dim_inner", "instantiation", "use_pool"),
         _slowfast_forward, _instantiation_problem),
    Peer("alexhex7", _has("_NonLocalBlockND", "g", "W"), _alexhex7_forward, _alexhex7_problem),
)}


class ConvertedNonLocal(nn.Module):
    """A converted block: the original block's attributes (sub-modules, parameters, buffers,
    hyper-parameters, mode, hooks) with the forward of its peer in :data:`SUPPORTED`, whose
    attention runs through ``nonlocal_attention(..., backend=self.nonlocal_backend)``."""

    def __init__(self, block: nn.Module, peer: str, backend: str = "auto"):
        super().__init__()
        # The block's own containers are copied (not shared), so that the two objects stay
        # independent; their contents (sub-modules, parameters, buffers, hooks) are the same.
        self.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v)
                              for k, v in block.__dict__.items()})
        self.peer = peer
        self.original_class = type(block)
        self.nonlocal_backend = backend

    def forward(self, *args, **kwargs):
        return SUPPORTED[self.peer].forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        cls = self.original_class
        return (f"converted from {cls.__module__}.{cls.__qualname__} ({self.peer}), "
                f"backend={self.nonlocal_backend!r}")


def _find(m: nn.Module) -> Optional[Peer]:
    """The supported peer ``m`` is a block of, if any."""
    return next((p for p in SUPPORTED.values() if p.matches(m)), None)


def convert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Convert every supported Non-local block inside ``model`` (``model`` itself included), in
    place, and return ``model``. Logs what it converted (logger "nonlocal_kernels"); warns, and
    leaves the block as it is, for a block it recognises but cannot run faithfully.
    :func:`converted_blocks` lists the converted blocks afterwards."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if _find(model) is not None and not isinstance(model, (ConvertedNonLocal, NonLocalBlock)):
        raise TypeError(f"model: is itself a Non-local block ({type(model).__qualname__}), "
                        f"which convert cannot replace in place; convert the model that holds "
                        f"it, or use nonlocal_kernels.ConvertedNonLocal(block, peer) directly")
    done, left = [], []

    def visit(parent: Optional[nn.Module], name: str, m: nn.Module) -> nn.Module:
        if isinstance(m, (ConvertedNonLocal, NonLocalBlock)):
            return m
        peer = _find(m)
        if peer is None:
            for child_name, child in list(m._modules.items()):
                if child is not None:
                    new = visit(m, f"{name}.{child_name}" if name else child_name, child)
                    if new is not child:
                        m._modules[child_name] = new
            return m
        problem = peer.problem(m)
        if problem is not None:
            left.append(name or "<model>")
            warnings.warn(f"nonlocal_kernels.convert: left {name or 'the model'} "
                          f"({type(m).__qualname__}) unconverted: {problem}", stacklevel=3)
            return m
        done.append(f"{name or '<model>'} ({peer.name} {type(m).__qualname__})")
        return ConvertedNonLocal(m, peer.name, backend)

    visit(None, "", model)
    log.info("nonlocal_kernels.convert: converted %d block(s)%s%s", len(done),
             (": " + ", ".join(done)) if done else "",
             f"; left {len(left)} unconverted: {', '.join(left)}" if left else "")
    return model


def converted_blocks(model: nn.Module) -> list:
    """[(name, peer, original class name)] of the converted blocks inside ``model``."""
    return [(name, m.peer, m.original_class.__qualname__) for name, m in model.named_modules()
            if isinstance(m, ConvertedNonLocal)]
