"""Export to ONNX: a model holding this library's blocks, in one call.

    import nonlocal_kernels.onnx
    program = nonlocal_kernels.onnx.export(model.eval(), (x,), "model.onnx")

or, with torch.onnx.export itself (dynamo=True, the default since torch 2.9)::

    torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                      custom_translation_table=nonlocal_kernels.onnx.translation_table())

torch.onnx's exporter turns a model into a torch.export graph, in which each block's attention
is one node of this library's forward op (docs/design.md section 2), and needs a translation of
that node into ONNX operators. ONNX has no fused operator for it before opset 23's
``Attention`` (which neither returns the softmax's lse nor runs on most deployed runtimes), so
the translations here write the block with standard operators:

- softmax family (``<ns>::softmax_fwd`` of every softmax backend): ``S = scale * theta phi^T``
  (MatMul), ``y = Softmax(S) g`` (Softmax, MatMul), ``lse = ReduceLogSumExp(S)``. The runtime
  materialises S and Softmax(S): two (B, N, M) tensors, ``2 * 4 * B * N * M`` bytes in float32
  (at N = 3136, M = 784: 19.7 MB per clip; at N = 25,088, M = 6,272: 1.26 GB per clip), the
  memory the fused kernels exist to avoid. The exporter's optimiser drops the lse nodes when
  nothing uses lse (a block never does).
- dot_product family (``nonlocal_kernels_fast::dot_product``): the exact reordering
  ``y = theta (scale phi^T g)``: nothing (B, N, M), only (B, dk, dv).
- concatenation family (``nonlocal_kernels_fast::concat_fwd``): refused, with an error naming
  the way out (its op also returns the sorted keys and prefix sums of its backward, which have
  no faithful translation here): run those blocks on ``backend="reference"`` for the export,
  which exports as plain PyTorch operators (materialising (B, N, M) the same way), and run
  that graph in ONNX Runtime with ``ORT_ENABLE_BASIC`` optimisations: the extended ones of
  ONNX Runtime 1.32 fuse a Transpose and a MatMul with a 1-D operand (theta w_theta) wrongly.

16-bit inputs are computed in float32 and the result cast back, as the kernels accumulate;
float64 stays float64 (only float32 is tested). Verified with ONNX Runtime on CPU
(tests/test_deploy.py: real mmaction2, timm and pytorchvideo models; docs/design.md section 11).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import ops
from .backends import registry

CONCAT_REFUSAL = (
    "nonlocal_kernels.onnx: mode 'concatenation' (op nonlocal_kernels_fast::concat_fwd) has no "
    "ONNX translation: the op also returns the sorted keys and prefix sums its backward uses, "
    "which standard ONNX operators do not reproduce faithfully. Export those blocks on "
    "backend='reference' (plain PyTorch operators; it materialises the N x M weights): "
    "nonlocal_kernels.convert(model, backend='reference') for converted blocks, "
    "block.backend = 'reference' for this library's NonLocalBlock. Run that graph in ONNX "
    "Runtime with graph_optimization_level=ORT_ENABLE_BASIC: ONNX Runtime 1.32's extended "
    "optimisations compute a Transpose followed by a MatMul with a 1-D operand, which it "
    "contains, wrongly (tests/test_deploy.py).")


def _opset():
    from onnxscript import opset18
    return opset18


def _compute_type(value):
    """The ONNX element type a translation computes in for an input of ``value``'s type:
    float32 for 16-bit floats, the type itself otherwise (float32, float64)."""
    import onnx_ir as ir
    if value.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return ir.DataType.FLOAT
    return value.dtype


def _softmax_fwd(theta, phi, g, scale: float):
    """(y, lse) of <ns>::softmax_fwd with standard operators (materialises (B, N, M) twice)."""
    op = _opset()
    ct = _compute_type(theta)
    t, p, v = (op.Cast(x, to=ct) if x.dtype != ct else x for x in (theta, phi, g))
    s = op.Mul(op.MatMul(t, op.Transpose(p, perm=[0, 2, 1])),
               op.CastLike(op.Constant(value_float=float(scale)), t))
    y = op.MatMul(op.Softmax(s, axis=-1), v)
    if y.dtype != theta.dtype:
        y = op.Cast(y, to=theta.dtype)
    lse = op.ReduceLogSumExp(s, op.Constant(value_ints=[-1]), keepdims=0)
    return y, lse


def _dot_product(a, b, c, scale: float):
    """(y, k) of nonlocal_kernels_fast::dot_product: k = scale b^T c, y = a k (no (B, N, M))."""
    op = _opset()
    ct = _compute_type(a)
    x, p, v = (op.Cast(t, to=ct) if t.dtype != ct else t for t in (a, b, c))
    k = op.Mul(op.MatMul(op.Transpose(p, perm=[0, 2, 1]), v),
               op.CastLike(op.Constant(value_float=float(scale)), v))
    y = op.MatMul(x, k)
    if y.dtype != a.dtype:
        y = op.Cast(y, to=a.dtype)
    return y, k


def _concat_fwd(theta, phi, g, w):
    raise NotImplementedError(CONCAT_REFUSAL)


def translation_table() -> dict[Callable, Callable]:
    """{op overload: ONNX Script translation} for every forward op of this library that is
    registered in this process: pass it to ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``."""
    table = {}
    namespaces = {b.namespace for b in map(registry.get, registry.names()) if b.namespace}
    for ns in sorted(namespaces):
        if ops._op_exists(f"{ns}::softmax_fwd"):
            table[ops.op(f"{ns}::softmax_fwd")] = _softmax_fwd
    for name, fn in (("dot_product", _dot_product), ("concat_fwd", _concat_fwd)):
        if ops._op_exists(f"nonlocal_kernels_fast::{name}"):
            table[ops.op(f"nonlocal_kernels_fast::{name}")] = fn
    return table


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, **kwargs)`` with this library's
    translations (:func:`translation_table`; a ``custom_translation_table`` in kwargs is
    merged over them). Returns the ONNXProgram. Put the model in eval mode first (a
    training-mode batch norm exports its batch statistics)."""
    if kwargs.get("dynamo", True) is not True:
        raise ValueError("dynamo: nonlocal_kernels.onnx.export needs dynamo=True (the "
                         "TorchScript exporter takes no translation table)")
    kwargs.pop("dynamo", None)
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table,
                             **kwargs)
