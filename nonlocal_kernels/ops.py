"""The operators, and what is registered on each of them.

One schema per kernel family (the op contract: docs/design.md section 2):

  softmax        <ns>::softmax_fwd(theta (B,N,dk), phi (B,M,dk), g (B,M,dv), float scale)
                     -> (y (B,N,dv), lse (B,N))
                 <ns>::softmax_bwd(dy, theta, phi, g, y, lse, float scale)
                     -> (dtheta, dphi, dg)
                 in four namespaces: ``nonlocal_kernels`` (C++, _C: CPU and CUDA kernels),
                 ``nonlocal_kernels_emu`` (C++, _C_emu: the CUDA kernels on CPU tensors, tests),
                 ``nonlocal_kernels_triton`` (Triton) and ``nonlocal_kernels_sdpa`` (PyTorch's
                 flash kernels, backends/sdpa.py). The C++ schema is csrc/ops_schema.h, the
                 Python one SOFTMAX_SCHEMAS (tests/test_ops.py ties them).
  dot_product    nonlocal_kernels_fast::dot_product (backends/fast.py)
  concatenation  nonlocal_kernels_fast::concat_fwd / concat_bwd (backends/fast.py); on CPU they
                 run the C++ nonlocal_kernels::concat_sorted_fwd / concat_sorted_bwd

Tensors may have any strides. ``lse`` is float32, or float64 for float64 inputs.

Registered on every op: a fake (shapes, dtypes and strides; it is also the op's meta kernel), a
vmap rule (the vmapped dim folded into the batch dim the ops already have, see
:func:`vmap_by_folding`) and autograd (``torch.library.register_autograd``): a forward op gets its
backward formula; a backward op gets its own formula where one is exact and cheap (fast's
dot_product_bwd), else a backward that raises, so a second derivative through a kernel that has
none is an error, never a silently wrong number.

``torch.func`` (grad, jacrev, vmap of a gradient) rejects the autograd.Function that
register_autograd builds (it has no ``setup_context``, torch <= 2.14), so the package's entry
point, ``nonlocal_attention``, runs every family through an autograd.Function with
``setup_context`` and a vmap rule: :class:`SoftmaxAttention` and :class:`SoftmaxBackward`
here, their dot_product and concatenation twins in backends/fast.py. Both routes share one
formula per family. (Each of these classes has a fixed signature: dynamo cannot trace an
autograd.Function with ``*args`` inside a backward.)
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.nonlocal_kernels.*)
    _C_ERROR: Optional[str] = None
except ImportError as exc:  # not built: the package still works with backend="reference"
    _C = None
    _C_ERROR = str(exc)

BUILD_HINT = ("Build the extension with `make setup` (or "
              "`pip install --no-build-isolation -e .` in an environment that has torch).")
NAMESPACE = "nonlocal_kernels"

SOFTMAX_SCHEMAS = {
    "softmax_fwd": "(Tensor theta, Tensor phi, Tensor g, float scale) -> (Tensor y, Tensor lse)",
    "softmax_bwd": "(Tensor dy, Tensor theta, Tensor phi, Tensor g, Tensor y, Tensor lse, "
                   "float scale) -> (Tensor dtheta, Tensor dphi, Tensor dg)",
}


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse's dtype for inputs of ``dtype`` (csrc/ops_common.h has the C++ twin)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def extension_unavailable_reason() -> Optional[str]:
    if _C is None:
        return f"nonlocal_kernels._C is not built or failed to load ({_C_ERROR})"
    return None


def _op_exists(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def kernel_unavailable_reason(dispatch_key: str, namespace: str = NAMESPACE,
                              names=("softmax_fwd", "softmax_bwd")) -> Optional[str]:
    """None when every namespace::name has a kernel for dispatch_key (e.g. "CPU")."""
    for name in names:
        qualname = f"{namespace}::{name}"
        if not _op_exists(qualname):
            return f"operator {qualname} is not registered"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key):
            return f"operator {qualname} has no {dispatch_key} kernel in this build"
    return None


def op(qualname: str) -> torch._ops.OpOverload:
    """The default overload of ``namespace::name``."""
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def double_backward_error(who: str) -> RuntimeError:
    return RuntimeError(
        f"double backward (a gradient of a gradient) is not supported by {who}: its backward "
        f"kernels have no derivative of their own. Use backend='reference' (plain PyTorch, "
        f"materialises N x M) to differentiate twice.")


# ------------------------------------------------------------------------------------------
# Calling an op from inside an autograd.Function
# ------------------------------------------------------------------------------------------
def _traced(args) -> bool:
    """Whether these arguments are being traced (torch.compile, export, fake or meta tensors)
    rather than computed."""
    return torch.compiler.is_compiling() or any(
        isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or a.is_meta) for a in args)


def run_op(op: Callable, *args, impl: Optional[Callable] = None):
    """``op(*args)`` for an autograd.Function of this package, whose own backward handles the
    gradients. Traced, it is the op itself, so graphs record the op. Computed, it skips the op's
    Python layers: its autograd kernel (register_autograd's, which would only find no gradient
    to record) and, for a custom op, the dispatch to ``impl``, its Python implementation. Those
    layers cost 20-50 us a call, as much as the whole computation at small sizes."""
    if _traced(args):
        return op(*args)
    if impl is not None:
        return impl(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _PositionalSignature(inspect.Signature):
    """A signature whose bind(*args) of positional arguments only is a tuple copy: every
    parameter of these forwards is positional and has no default, so that is exactly what
    inspect.Signature.bind followed by apply_defaults would return."""

    class _Bound:
        def __init__(self, args):
            self.args, self.kwargs = args, {}

        def apply_defaults(self):
            pass

    def bind(self, *args, **kwargs):
        if kwargs or len(args) != len(self.parameters):
            return super().bind(*args, **kwargs)
        return self._Bound(args)


def fast_apply(cls):
    """Class decorator for this package's autograd.Functions (setup_context style, positional
    arguments without defaults): torch's ``apply`` binds ``forward``'s arguments through
    inspect.signature(forward).bind on every call, which parses the signature and binds in
    Python (15-25 us a call, as much as a small problem's whole forward); forward's
    ``__signature__`` makes that a tuple copy."""
    params = inspect.signature(cls.forward).parameters.values()
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params), cls
    cls.forward.__signature__ = _PositionalSignature(list(params))
    return cls


# ------------------------------------------------------------------------------------------
# vmap: every op takes a leading batch dim, so a vmapped dim folds into it
# ------------------------------------------------------------------------------------------
def fold_batch(info, in_dims, args) -> list:
    """args with each tensor's vmapped dim moved to the front and merged with its batch dim
    (an unbatched tensor is expanded first): (V, B, ...) -> (V * B, ...)."""
    out = []
    for a, d in zip(args, in_dims):
        if isinstance(a, torch.Tensor):
            a = a.movedim(d, 0) if d is not None else a.expand((info.batch_size,) + a.shape)
            a = a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
        out.append(a)
    return out


def unfold_batch(outputs, batch_size: int):
    """The inverse of fold_batch on an op's outputs: (V * B, ...) -> (V, B, ...), out_dims 0."""
    def one(t):
        return t.reshape((batch_size, t.shape[0] // batch_size) + t.shape[1:])
    if isinstance(outputs, torch.Tensor):
        return one(outputs), 0
    return tuple(one(t) for t in outputs), (0,) * len(outputs)


def vmap_by_folding(fn: Callable) -> Callable:
    """A vmap rule for an op ``fn(*args)`` whose tensor arguments and outputs all lead with the
    batch dim: run it once on the folded batch."""
    def rule(info, in_dims, *args):
        return unfold_batch(fn(*fold_batch(info, in_dims, args)), info.batch_size)
    return rule


def vmap_by_loop(fn: Callable) -> Callable:
    """A vmap rule that runs ``fn`` once per vmapped slice and stacks the outputs: for ops with
    an output that is not per batch element (a weight's gradient sums over the batch)."""
    def rule(info, in_dims, *args):
        outs = [fn(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)])
                for i in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return rule



# ------------------------------------------------------------------------------------------
# The softmax family
# ------------------------------------------------------------------------------------------
def _softmax_fwd_fake(theta, phi, g, scale):
    B, N, _ = theta.shape
    y = theta.new_empty((B, N, g.shape[-1]), dtype=g.dtype)
    lse = theta.new_empty((B, N), dtype=lse_dtype(theta.dtype))
    return y, lse


def _softmax_bwd_fake(dy, theta, phi, g, y, lse, scale):
    return torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g)


def _softmax_keep_fwd_fake(theta, phi, g, scale, keep):
    y, lse = _softmax_fwd_fake(theta, phi, g, scale)
    B, N = lse.shape
    shape = (B, N, phi.shape[1]) if keep else (B, 0, 0)
    return y, lse, theta.new_empty(shape, dtype=lse.dtype)


def _softmax_keep_bwd_fake(dy, theta, phi, g, y, lse, scores, scale):
    return _softmax_bwd_fake(dy, theta, phi, g, y, lse, scale)


def softmax_grads(bwd: Callable, dy, dlse, theta, phi, g, y, lse, scale: float) -> tuple:
    """(dtheta, dphi, dg) from the gradients of y and lse (either may be None).

    A gradient into lse needs nothing new from the kernels: d lse_i / d S_ij = P_ij, so it only
    shifts D_i = rowsum(dy_i * y_i) by -dlse_i. Appending a column (y: 1, dy: -dlse, g: 0) to
    the backward's inputs does exactly that; the extra column of dg is dropped. It costs
    O((N + M) dv) and only runs when lse is used."""
    if dy is None and dlse is None:
        return None, None, None
    if dy is None:
        dy = torch.zeros_like(y)
    if dlse is not None:
        y = torch.cat([y, y.new_ones(y.shape[:-1] + (1,))], dim=-1)
        dy = torch.cat([dy, -dlse.to(dy.dtype).unsqueeze(-1)], dim=-1)
        g = torch.cat([g, g.new_zeros(g.shape[:-1] + (1,))], dim=-1)
    dtheta, dphi, dg = bwd(dy, theta, phi, g, y, lse, scale)
    if dlse is not None:
        dg = dg[..., :-1]
    return dtheta, dphi, dg


def _softmax_save(ctx, theta, phi, g, scale, output) -> None:
    """What a softmax forward keeps for its backward: the inputs, y, lse and, from the keep
    ops, the scores (a (B, 0, 0) tensor when they were not kept)."""
    ctx.save_for_backward(theta, phi, g, *output)
    ctx.scale = scale
    ctx.set_materialize_grads(False)
    if len(output) > 2:
        ctx.mark_non_differentiable(output[2])


def _softmax_saved(ctx) -> tuple:
    """(theta, phi, g, y, lse, scores or None) as _softmax_save kept them."""
    saved = ctx.saved_tensors
    return tuple(saved[:5]) + ((saved[5] if len(saved) > 5 else None),)


def _softmax_setup(ctx, inputs, output):
    _softmax_save(ctx, *inputs[:4], output)


def register_softmax_ops(namespace: str, fake: bool = True, keep: bool = False) -> None:
    """Register the fake, vmap and autograd of namespace::softmax_fwd / softmax_bwd, and with
    ``keep`` of its softmax_keep_fwd / softmax_keep_bwd too (the CPU kernel's variant, whose
    forward can keep the scores for the backward: csrc/ops_schema.h).

    ``fake=False`` when the op's own definition already provides one (Triton's triton_op)."""
    pairs = [("softmax_fwd", "softmax_bwd", _softmax_fwd_fake, _softmax_bwd_fake)]
    if keep:
        pairs.append(("softmax_keep_fwd", "softmax_keep_bwd", _softmax_keep_fwd_fake,
                      _softmax_keep_bwd_fake))
    for fwd_name, bwd_name, fwd_fake, bwd_fake in pairs:
        fwd, bwd = op(f"{namespace}::{fwd_name}"), op(f"{namespace}::{bwd_name}")
        if fake:
            torch.library.register_fake(fwd, fwd_fake)
            torch.library.register_fake(bwd, bwd_fake)
        torch.library.register_vmap(fwd, vmap_by_folding(fwd))
        torch.library.register_vmap(bwd, vmap_by_folding(bwd))

        def backward(ctx, dy, dlse, *_, bwd=bwd):  # *_: the scores, not differentiable
            theta, phi, g, y, lse, scores = _softmax_saved(ctx)
            kept = () if scores is None else (scores,)
            grads = softmax_grads(lambda *a: bwd(*a[:6], *kept, a[6]), dy, dlse, theta, phi, g,
                                  y, lse, ctx.scale)
            return grads + (None,) * (1 + len(kept))  # scale (and keep)

        def refuse(ctx, *grads, name=f"{namespace}::{bwd_name}"):
            raise double_backward_error(name)

        torch.library.register_autograd(fwd, backward, setup_context=_softmax_setup)
        torch.library.register_autograd(bwd, refuse,
                                        setup_context=lambda ctx, inputs, output: None)


def _softmax_bwd_call(namespace: str, dy, theta, phi, g, y, lse, scores, scale) -> tuple:
    """namespace's softmax_bwd, or softmax_keep_bwd with the forward's scores (not None)."""
    if scores is None:
        return run_op(op(f"{namespace}::softmax_bwd"), dy, theta, phi, g, y, lse, scale)
    return run_op(op(f"{namespace}::softmax_keep_bwd"), dy, theta, phi, g, y, lse, scores, scale)


@fast_apply
class SoftmaxBackward(torch.autograd.Function):
    """``apply(who, namespace, dy, theta, phi, g, y, lse, scores, scale)``: namespace's
    softmax_bwd (``scores`` None) or softmax_keep_bwd, whose own backward raises (``who``, the
    backend's name, appears in the message)."""

    @staticmethod
    def forward(who, namespace, dy, theta, phi, g, y, lse, scores, scale):
        return _softmax_bwd_call(namespace, dy, theta, phi, g, y, lse, scores, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.who = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error(f"backend {ctx.who!r}")

    @staticmethod
    def vmap(info, in_dims, who, namespace, *args):
        return vmap_by_folding(lambda *a: SoftmaxBackward.apply(who, namespace, *a))(
            info, in_dims[2:], *args)


def softmax_bwd_fn(who: str, namespace: str, scores) -> Callable:
    """``bwd(dy, theta, phi, g, y, lse, scale)`` for :func:`softmax_grads`: namespace's backward
    op (with the forward's kept ``scores``, or None), alone when no graph is recorded, else
    through SoftmaxBackward (whose own backward refuses, naming ``who``)."""
    def bwd(dy, theta, phi, g, y, lse, scale):
        if not torch.is_grad_enabled():  # no graph to record: the op alone
            return _softmax_bwd_call(namespace, dy, theta, phi, g, y, lse, scores, scale)
        return SoftmaxBackward.apply(who, namespace, dy, theta, phi, g, y, lse, scores, scale)
    return bwd


@fast_apply
class SoftmaxAttention(torch.autograd.Function):
    """``apply(who, namespace, keep, theta, phi, g, scale)`` through namespace's softmax ops;
    ``who`` (the backend's name) appears in errors. ``keep`` None: softmax_fwd, returns
    (y, lse); True or False: softmax_keep_fwd, returns (y, lse, scores), the scores kept for the
    backward when ``keep`` (not differentiable). Gradients flow into y and lse."""

    @staticmethod
    def forward(who, namespace, keep, theta, phi, g, scale):
        if keep is None:
            return run_op(op(f"{namespace}::softmax_fwd"), theta, phi, g, scale)
        return run_op(op(f"{namespace}::softmax_keep_fwd"), theta, phi, g, scale, keep)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _softmax_save(ctx, *inputs[3:], output)
        ctx.who, ctx.namespace = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, dy, dlse, *_):  # *_: the scores' gradient (they are not differentiable)
        theta, phi, g, y, lse, scores = _softmax_saved(ctx)
        bwd = softmax_bwd_fn(ctx.who, ctx.namespace, scores)
        return (None, None, None) + softmax_grads(bwd, dy, dlse, theta, phi, g, y, lse,
                                                  ctx.scale) + (None,)

    @staticmethod
    def vmap(info, in_dims, who, namespace, keep, theta, phi, g, scale):
        theta, phi, g = fold_batch(info, in_dims[3:6], (theta, phi, g))
        return unfold_batch(SoftmaxAttention.apply(who, namespace, keep, theta, phi, g, scale),
                            info.batch_size)


def softmax_runner(who: str, namespace: str, keep: Optional[Callable] = None) -> Callable:
    """A softmax backend's ``run``: SoftmaxAttention over namespace's ops. ``keep``: for a
    namespace with the softmax_keep ops, ``keep(theta, phi, g) -> Optional[bool]`` decides per
    call: True or False, softmax_keep_fwd with that ``keep`` (whether it returns the scores for
    the backward); None, the family's softmax_fwd (so a graph that keeps nothing, an inference
    export for one, holds the family's ops only)."""
    def run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
        k = keep(theta, phi, g) if keep is not None else None
        y, lse = SoftmaxAttention.apply(who, namespace, k, theta, phi, g, float(scale))[:2]
        return (y, lse) if return_lse else y
    return run


# ------------------------------------------------------------------------------------------
# The compiled ops of this extension
# ------------------------------------------------------------------------------------------
def _concat_sorted_fwd_fake(a, neg_b_sorted, perm, g):
    B, N = a.shape
    M, dv = g.shape[1:]
    return (a.new_empty((B, N, dv)), a.new_empty((B, M + 1, 2, dv)),
            a.new_empty((B, N), dtype=torch.long))


def _concat_sorted_bwd_fake(dy, a, k, P, neg_b_sorted, perm, g, theta, phi, w):
    return (torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g),
            a.new_empty((w.shape[0],)))


def _concat_sorted_not_differentiable(ctx, *grads):
    raise RuntimeError("nonlocal_kernels::concat_sorted_fwd / _bwd are the CPU kernels inside "
                       "backend 'fast' and have no autograd of their own: differentiate through "
                       "nonlocal_attention(..., mode='concatenation')")


if _C is not None:
    register_softmax_ops(NAMESPACE, keep=True)
    for _name, _fake in (("concat_sorted_fwd", _concat_sorted_fwd_fake),
                         ("concat_sorted_bwd", _concat_sorted_bwd_fake)):
        torch.library.register_fake(op(f"{NAMESPACE}::{_name}"), _fake)
        torch.library.register_autograd(op(f"{NAMESPACE}::{_name}"),
                                        _concat_sorted_not_differentiable,
                                        setup_context=lambda ctx, inputs, output: None)
