"""Backend ``fast``: exact reorderings of the dot_product and concatenation modes.

Both modes have algebraic shortcuts that never form the N x M affinity. Written with PyTorch ops
(bmm, sort, searchsorted, embedding_bag, cumsum / triangular matmul, index_select), so they run
on CPU and CUDA tensors alike. The ops (namespace nonlocal_kernels_fast, see ops.py for what is
registered on them):

  dot_product(a, b, c, scale) -> (y, k)          y = scale (a b^T) c, k = scale b^T c
  dot_product_bwd(dy, a, b, c, k, scale) -> (da, db, dc)
  concat_fwd(theta, phi, g, w) -> (y, a, neg_b_sorted, perm, k, P)
  concat_bwd(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P) -> (dtheta, dphi, dg, dw)

Outputs that stand for an input (y for theta, a gradient for its input) are channels-first when
that input is, so autograd and the modules' transposes copy nothing.

dot_product, y = (theta phi^T) g / M (scale = 1/M):
  - "reordered": y = theta K with K = phi^T g / M. Forward 2·dk·dv·(N+M) FLOPs, a (dk, dv)
    intermediate (returned as k). Backward dtheta = dy K^T; dK = theta^T dy / M;
    dphi = g dK^T; dg = phi dK.
  - "naive": S = theta phi^T (N x M), y = S g / M. Forward 2·N·M·(dk+dv) FLOPs.
  Each call takes the path with fewer FLOPs (backward has the same ratio as forward). "naive" is
  only taken when N·M·(dk+dv) < dk·dv·(N+M), which implies N·M < min(dk, dv)·(N+M): its N x M
  matrix is then no bigger than the inputs, so memory stays O((N+M)·d) either way.
  Every gradient is again a dot product of the same form, so the backward is differentiable
  to any order (double backward is exact).

concatenation, y_i = (1/M) sum_j ReLU(a_i + b_j) g_j with a = theta·w_theta, b = phi·w_phi:
  query i reaches exactly the keys with -b_j < a_i, i.e. the k_i keys of largest b, where
  k_i = searchsorted(sort(-b), a_i) (strict "<": a pair with a_i + b_j exactly 0 contributes
  nothing and gets ReLU's gradient 0, as in PyTorch; ties in a or b need nothing special).
  With prefix sums P_g, P_bg of g and b·g over the keys by decreasing b,
      y_i = (P_bg[k_i] + a_i · P_g[k_i]) / M   (one embedding_bag over P's rows, 1/M and a_i
                                               on its per-sample weights).
  Backward: the key of descending-b rank d is reached by the queries with k_i > d. Sorting the
  queries by k makes each value of k a contiguous bag; one embedding_bag sums dy_i/M and
  a_i·dy_i/M per bag, suffix sums over the bags give S_dy(d) and S_ady(d), and
      dg_j = b_j · S_dy(j) + S_ady(j),   db_j = g_j · S_dy(j),   da_i = dy_i · P_g[k_i] / M,
      dtheta = da w_theta^T, dphi = db w_phi^T, dw = [sum_i da_i theta_i, sum_j db_j phi_j].
  da is embedding_bag's per-sample-weight gradient (gather and dot in one pass, no N x dv
  scratch); dg and db are formed in sorted key order and un-sorted with one gather.
  O((N+M)·(log + d)) time, O((N+M)·d) memory; deterministic (no atomics, no scatters).
  CPU prefix/suffix sums are blocked triangular products (torch.cumsum along a non-last dim is
  several times slower here); CUDA uses torch.cumsum.

  On CPU, when nonlocal_kernels._C is built, two fused C++ kernels (csrc/fast/concat_sorted.cpp)
  replace these op chains: forward = prefix sums (in float64) + binary search + output rows;
  backward = da + per-k bins + suffix sums (in float64) + dg + db + the projections' gradients
  (dtheta, dphi, dw); the projections a and b are a third C++ op (concat_project: split over
  threads past 2^16 elements per thread, as the kernels' other loops), the sort stays a
  PyTorch op. The loops are built per instruction set (AVX-512, AVX2, portable;
  NONLOCAL_KERNELS_CPU_ISA as for the CPU softmax kernels). On the 2-core development
  VM, I3D res3 forward+backward takes 4.4-9.0 ms with them and 7.0-11.5 ms without, on one
  thread (section 1 of benchmarks/results/fast-paths-2026-11-24.md).
  :func:`use_compiled_concat` switches them off (the pure-PyTorch version above then runs).
  A second backward through concatenation raises (it has no derivative of its own).

Precision: a, b and every sum are computed in float32 from float16/bfloat16 inputs (float64 for
float64 inputs) and the results are rounded to the input dtype at the end. The pure-PyTorch da
runs in row chunks (which bound per-call temporaries at long-video sizes).

Debug hook: :func:`last_path` / :func:`record_paths` (the registry's, shared with backend cpu)
say which path a call took ("reordered", "naive" or "sorted"); :func:`force_dot_product_path`
overrides the cost model (tests, benchmarks). The hook state is process-global and not
thread-safe (it is a debugging aid).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..modes import FLOAT_DTYPES, MODES
from .registry import Backend, last_path, record_paths, register  # noqa: F401 (re-exported)
from .registry import note_path as _note

DOT_PATHS = ("reordered", "naive")

# Scratch work over the N query rows (the gather in da) runs in chunks of about this many
# elements, which bounds the temporary at long-video sizes (4 MB on CPU; on CUDA 64 MB, few
# launches). Smaller CPU chunks were measured slower here (per-op overhead).
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_OTHER = 1 << 24

_forced_dot_path: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Debug hook and cost model
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def force_dot_product_path(path: Optional[str]) -> Iterator[None]:
    """Make dot_product take ``path`` ("reordered" or "naive"; None = the cost model)."""
    global _forced_dot_path
    if path is not None and path not in DOT_PATHS:
        raise ValueError(f"path: expected one of {', '.join(DOT_PATHS)} or None, got {path!r}")
    outer, _forced_dot_path = _forced_dot_path, path
    try:
        yield
    finally:
        _forced_dot_path = outer


def dot_product_flops(N: int, M: int, dk: int, dv: int) -> dict:
    """Forward FLOPs per batch element of each dot_product path (backward is twice these)."""
    return {"naive": 2 * N * M * (dk + dv), "reordered": 2 * dk * dv * (N + M)}


def choose_dot_product_path(N: int, M: int, dk: int, dv: int) -> str:
    """"reordered" unless the naive order needs strictly fewer FLOPs."""
    if _forced_dot_path is not None:
        return _forced_dot_path
    cost = dot_product_flops(N, M, dk, dv)
    return "naive" if cost["naive"] < cost["reordered"] else "reordered"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(x: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bmm(x, y) in like's dtype, laid out like ``like`` when that is a channels-first view
    (B, L, d) of a (B, d, L) tensor: autograd would otherwise copy a gradient into its leaf's
    layout (a transposed copy costs as much as the product here)."""
    if like.dim() == 3 and like.shape[1] > 1 and like.transpose(1, 2).is_contiguous():
        out = torch.bmm(y.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)
    else:
        out = torch.bmm(x, y)
    return out.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Layouts: outputs are channels-first when the tensor they stand for is
# ---------------------------------------------------------------------------------------------

def _channels_first(t: torch.Tensor) -> bool:
    """Whether t (B, L, d) with L > 1 is a channels-first view: t.transpose(1, 2) is a
    contiguous (B, d, L) tensor, as the modules pass theta / phi / g. (From the strides: the
    transposed view costs more than the whole check at small sizes.)"""
    B, L, d = t.shape
    s0, s1, s2 = t.stride()
    return L > 1 and s1 == 1 and (d == 1 or s2 == L) and (B == 1 or s0 == d * L)


def _empty_laid_out_like(like: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, L, d) tensor, channels-first when ``like`` is (else contiguous): gradients
    and outputs in the layout of what they stand for need no layout copy in autograd or in the
    modules' transposes. The ops and their fakes both lay outputs out with this."""
    B, L, d = shape
    if _channels_first(like):
        return like.new_empty((B, d, L), dtype=dtype).transpose(1, 2)
    return like.new_empty((B, L, d), dtype=dtype)


def _bmm_like(x: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bmm(x, y) in like's dtype and laid out as _empty_laid_out_like(like, ...) lays it out: a
    channels-first result is the transposed product bmm(y^T, x^T), which costs the same."""
    if _channels_first(like):
        out = torch.bmm(y.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)
    else:
        out = torch.bmm(x, y)
    return out.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# dot_product: y = scale (a b^T) c
# ---------------------------------------------------------------------------------------------

FAST_NS = "nonlocal_kernels_fast"


def _dot_shapes(a, b, c):
    B, L, d1 = a.shape
    K, d2 = c.shape[1:]
    return B, L, K, d1, d2


def _dot_product(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, k): y = scale (a b^T) c, (B, L, d1), (B, K, d1), (B, K, d2) -> (B, L, d2) laid out
    like a, by the cheaper exact order; k = scale b^T c (B, d1, d2), the reordered path's
    product, which the backward reuses."""
    B, L, K, d1, d2 = _dot_shapes(a, b, c)
    path = choose_dot_product_path(L, K, d1, d2)
    _note("dot_product", path)
    cdt = _compute_dtype(a.dtype)
    k = torch.bmm(b.to(cdt).transpose(1, 2), c.to(cdt)).mul_(scale)  # (B, d1, d2)
    if path == "reordered":
        y = _bmm_like(a.to(cdt), k, a)
    else:
        S = torch.bmm(a.to(cdt), b.to(cdt).transpose(1, 2)).mul_(scale)  # (B, L, K)
        y = _bmm_like(S, c.to(cdt), a)
    return y, k


dot_product_op = torch.library.custom_op(f"{FAST_NS}::dot_product", mutates_args=())(_dot_product)


@dot_product_op.register_fake
def _(a, b, c, scale):
    B, L, K, d1, d2 = _dot_shapes(a, b, c)
    return (_empty_laid_out_like(a, (B, L, d2), a.dtype),
            a.new_empty((B, d1, d2), dtype=_compute_dtype(a.dtype)))


def _dot_product_bwd(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     k: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, dc) of y = scale (a b^T) c, each laid out like its input:
    da = scale (dy c^T) b = dy k^T, db = scale (c dy^T) a, dc = scale (b a^T) dy."""
    B, L, K, d1, d2 = _dot_shapes(a, b, c)
    cdt = k.dtype
    x, p, v, dy = a.to(cdt), b.to(cdt), c.to(cdt), dy.to(cdt)
    if choose_dot_product_path(L, K, d1, d2) == "reordered":
        da = _bmm_like(dy, k.transpose(1, 2), a)
        dk = torch.bmm(x.transpose(1, 2), dy).mul_(scale)  # (B, d1, d2)
        db = _bmm_like(v, dk.transpose(1, 2), b)
        dc = _bmm_like(p, dk, c)
    else:
        dS = torch.bmm(dy, v.transpose(1, 2)).mul_(scale)  # (B, L, K)
        da = _bmm_like(dS, p, a)
        db = _bmm_like(dS.transpose(1, 2), x, b)
        del dS
        S = torch.bmm(x, p.transpose(1, 2)).mul_(scale)
        dc = _bmm_like(S.transpose(1, 2), dy, c)
    return da, db, dc


dot_product_bwd_op = torch.library.custom_op(f"{FAST_NS}::dot_product_bwd",
                                             mutates_args=())(_dot_product_bwd)


@dot_product_bwd_op.register_fake
def _(dy, a, b, c, k, scale):
    return tuple(_empty_laid_out_like(t, t.shape, t.dtype) for t in (a, b, c))


def _dot_double_backward(dot, dy, a, b, c, ua, ub, uc) -> tuple:
    """Gradients (for dy, a, b, c) of <ua, da> + <ub, db> + <uc, dc> with da, db, dc as in
    dot_product_bwd: each term is again a dot product, dot(x, y, z) = scale (x y^T) z, so this
    is differentiable to any order. None upstream gradients contribute nothing."""
    def total(*terms):
        terms = [dot(*t) for t in terms if all(x is not None for x in t)]
        return sum(terms[1:], terms[0]) if terms else None
    return (total((ua, b, c), (a, ub, c), (a, b, uc)),
            total((dy, c, ub), (dy, uc, b)),
            total((c, dy, ua), (uc, dy, a)),
            total((b, ua, dy), (ub, a, dy)))


def _dot_setup(ctx, inputs, output):
    a, b, c, scale = inputs[-4:]
    ctx.save_for_backward(a, b, c, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _dot_bwd_setup(ctx, inputs, output):
    dy, a, b, c, k, scale = inputs
    ctx.save_for_backward(dy, a, b, c)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _dot_grads(bwd, ctx, dy) -> tuple:
    """(da, db, dc, None) by ``bwd`` (dot_product_bwd, or DotProductBackward.apply)."""
    a, b, c, k = ctx.saved_tensors
    if dy is None:
        return None, None, None, None
    return bwd(dy, a, b, c, k, ctx.scale) + (None,)


def _dot_grads_of_grads(dot, ctx, ua, ub, uc) -> tuple:
    """The gradients of dot_product_bwd's inputs, by ``dot(x, y, z) = scale (x y^T) z``."""
    dy, a, b, c = ctx.saved_tensors
    return _dot_double_backward(lambda x, y, z: dot(x, y, z, ctx.scale)[0], dy, a, b, c,
                                ua, ub, uc) + (None, None)


def _register_dot_autograd():
    dot_product_op.register_autograd(
        lambda ctx, dy, dk: _dot_grads(dot_product_bwd_op, ctx, dy), setup_context=_dot_setup)
    dot_product_bwd_op.register_autograd(
        lambda ctx, ua, ub, uc: _dot_grads_of_grads(dot_product_op, ctx, ua, ub, uc),
        setup_context=_dot_bwd_setup)
    dot_product_op.register_vmap(ops.vmap_by_folding(dot_product_op))
    dot_product_bwd_op.register_vmap(ops.vmap_by_folding(dot_product_bwd_op))


_register_dot_autograd()


@ops.fast_apply
class DotProduct(torch.autograd.Function):
    """``apply(a, b, c, scale) -> (y, k)`` through the dot_product ops, for torch.func (see
    ops.py); its backward is :class:`DotProductBackward`, itself differentiable."""

    @staticmethod
    def forward(a, b, c, scale):
        return ops.run_op(dot_product_op, a, b, c, scale, impl=_dot_product)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dot_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy, dk):
        if not torch.is_grad_enabled():  # no graph to record: the op alone
            return _dot_grads(lambda *a: ops.run_op(dot_product_bwd_op, *a,
                                                    impl=_dot_product_bwd), ctx, dy)
        return _dot_grads(DotProductBackward.apply, ctx, dy)

    @staticmethod
    def vmap(info, in_dims, a, b, c, scale):
        args = ops.fold_batch(info, in_dims[:3], (a, b, c))
        return ops.unfold_batch(DotProduct.apply(*args, scale), info.batch_size)


@ops.fast_apply
class DotProductBackward(torch.autograd.Function):
    """``apply(dy, a, b, c, k, scale) -> (da, db, dc)``; differentiable (_dot_double_backward)."""

    @staticmethod
    def forward(dy, a, b, c, k, scale):
        return ops.run_op(dot_product_bwd_op, dy, a, b, c, k, scale, impl=_dot_product_bwd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dot_bwd_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, ua, ub, uc):
        return _dot_grads_of_grads(DotProduct.apply, ctx, ua, ub, uc)

    @staticmethod
    def vmap(info, in_dims, dy, a, b, c, k, scale):
        args = ops.fold_batch(info, in_dims[:5], (dy, a, b, c, k))
        return ops.unfold_batch(DotProductBackward.apply(*args, scale), info.batch_size)


def dot_product(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, N, dk), (B, M, dk), (B, M, dv) -> (theta phi^T) g / M by the cheaper exact path."""
    return DotProduct.apply(theta, phi, g, 1.0 / phi.shape[1])[0]


# ---------------------------------------------------------------------------------------------
# concatenation
# ---------------------------------------------------------------------------------------------

_SCAN_BLOCK = 16


def _row_chunks(N: int, width: int, device: torch.device) -> list:
    """[(n0, n1), ...] covering range(N) so that a (rows, width) temporary stays small."""
    per = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_OTHER)
    rn = max(1, min(N, per // max(1, width)))
    return [(n0, min(N, n0 + rn)) for n0 in range(0, N, rn)]


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, w) with any strides, idx (B, n) int64 -> x[b, idx[b, i]] as (B, n, w) by row
    copies (index_select; torch.gather with an expanded index is an order of magnitude slower
    on CPU)."""
    B, n = idx.shape
    if B == 1:
        return x.index_select(1, idx[0])
    out = torch.empty(B, n, x.shape[2], dtype=x.dtype, device=x.device)
    for i in range(B):
        torch.index_select(x[i], 0, idx[i], out=out[i])
    return out


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for (B, L, w) tensors; a channels-first dst (each dst[i] the transpose of
    a contiguous (w, L) matrix) is copied per batch as 2-D transposes, which take PyTorch's
    blocked-transpose copy (about twice as fast here as the generic 3-D strided copy)."""
    if dst.shape[1] > 1 and all(dst[i].t().is_contiguous() for i in range(dst.shape[0])):
        for i in range(dst.shape[0]):
            dst[i].t().copy_(src[i].t())
        return dst
    return dst.copy_(src)


def _cumsum_rows(x: torch.Tensor, out: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """out (B, L, W) = inclusive prefix sums of x (B, L, W) along dim 1 (suffix sums when
    reverse); on CPU every x[i] and out[i] must be contiguous (any batch stride).

    CUDA: torch.cumsum (of the flipped rows when reverse). CPU: torch.cumsum along a non-last
    dim runs about 3-7 ns per element here, so the scan is blocked: sums inside blocks of
    _SCAN_BLOCK rows as a batched product with a triangular matrix of ones written straight into
    out (plain adds in x's dtype; CPU matmul has no TF32), then the running block totals (a
    short cumsum) added to each block.
    """
    if x.device.type != "cpu":
        if reverse:
            return out.copy_(torch.cumsum(x.flip(1), 1).flip(1))
        return torch.cumsum(x, 1, out=out)
    B, L, W = x.shape
    T = _SCAN_BLOCK
    nb, r = divmod(L, T)
    b0 = r if reverse else 0  # reverse: blocks end at row L, a ragged block (if any) first
    tri = _triangle_ones(T, x.dtype, reverse)
    for i in range(B):
        xi, oi = x[i], out[i]
        if nb:
            ob = oi[b0:b0 + nb * T].view(nb, T, W)
            torch.bmm(tri.expand(nb, T, T), xi[b0:b0 + nb * T].view(nb, T, W), out=ob)
            if nb > 1:
                if reverse:  # block c gets the totals of blocks c+1.. (their first rows)
                    tails = torch.cumsum(ob[1:, 0].flip(0), 0).flip(0)
                    ob[:-1] += tails.unsqueeze(1)
                else:
                    ob[1:] += torch.cumsum(ob[:-1, -1], 0).unsqueeze(1)
        if r:
            rest = slice(0, r) if reverse else slice(L - r, L)
            tr = tri[:r, :r] if not reverse else tri[T - r:, T - r:]
            torch.mm(tr, xi[rest], out=oi[rest])
            if nb:
                oi[rest] += oi[r] if reverse else oi[L - r - 1]
    return out


@functools.lru_cache(maxsize=None)
def _triangle_ones(T: int, dtype: torch.dtype, upper: bool) -> torch.Tensor:
    ones = torch.ones(T, T, dtype=dtype)
    return ones.triu_() if upper else ones.tril_()


def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, L, dk) @ (dk,) -> (B, L) in w's dtype (x converted when it differs); bmm reads
    channels-first views in place."""
    B, L, dk = x.shape
    return torch.bmm(x.to(w.dtype), w.view(1, dk, 1).expand(B, dk, 1)).view(B, L)


def _weight_grad(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_b sum_l d[b, l] x[b, l, :] -> (dk,) in d's dtype."""
    return torch.bmm(d.unsqueeze(1), x.to(d.dtype)).sum((0, 1))


def _key_prefix_sums(g: torch.Tensor, perm: torch.Tensor, b_sorted: torch.Tensor,
                     cdt: torch.dtype) -> tuple:
    """(P, x): x (B, M, 2, dv) in cdt holds g[perm] and b_sorted * g[perm]; P (B, M + 1, 2, dv), keys by decreasing b (perm): P[:, r, 0] = sum of g over the
    first r keys, P[:, r, 1] the same for b_sorted * g; P[:, 0] = 0 (no 1/M: the callers fold
    it into their weights). Row r of both sums sits in one contiguous (2, dv) block, so the scan
    runs once over rows of width 2·dv and every gathered row P[b, r, s] is contiguous."""
    B, M, dv = g.shape
    x = torch.empty(B, M, 2, dv, dtype=cdt, device=g.device)
    for i in range(B):
        if g.dtype == cdt:
            torch.index_select(g[i], 0, perm[i], out=x[i, :, 0])
        else:
            x[i, :, 0] = g[i].index_select(0, perm[i])
    torch.mul(x[:, :, 0], b_sorted.unsqueeze(-1), out=x[:, :, 1])
    P = torch.empty(B, M + 1, 2, dv, dtype=cdt, device=g.device)
    P[:, 0].zero_()
    _cumsum_rows(x.view(B, M, 2 * dv), out=P.view(B, M + 1, 2 * dv)[:, 1:])
    return P, x


def _query_sums_by_key(dy: torch.Tensor, a: torch.Tensor, k: torch.Tensor, M: int,
                       cdt: torch.dtype) -> torch.Tensor:
    """R (B, 2, M, dv) in cdt, keys by decreasing b: R[:, 0, d] holds the sum of dy_i / M
    (R[:, 1, d] of a_i dy_i / M) over the queries i with k_i > d, i.e. what the key of
    descending-b rank d receives: query i reaches the k_i keys of largest b.

    Query i goes to bin k_i; sorting the queries by k makes each bin a contiguous bag, and one
    embedding_bag call sums every bag (deterministic, no atomics, multithreaded on CPU); suffix
    sums over the bins 1..M then give R. The 1/M rides on the bag weights. dy: (B, N, dv)
    contiguous.
    """
    B, N, dv = dy.shape
    dev = dy.device
    k_sorted, order = torch.sort(k, dim=1)
    # Bin c of batch b: positions [edges(b, c), edges(b, c + 1)) of the sorted queries.
    edges = torch.searchsorted(k_sorted, torch.arange(M + 1, device=dev).expand(B, M + 1)
                               .contiguous())  # #{i : k_i < c} = start of bin c
    # The index lists, per batch b, the sorted queries twice: part 0 sums dy_i / M, part 1
    # sums a_i dy_i / M (the same rows, weighted by a). Bag (b, part, c) starts at
    # (2 b + part) N + edges(b, c), so the bags come out in (b, part, c) order.
    rows = order + N * torch.arange(B, device=dev).unsqueeze(1)
    index = torch.stack([rows, rows], 1).view(-1)
    weights = torch.stack([torch.full((B, N), 1.0 / M, dtype=cdt, device=dev),
                           torch.gather(a, 1, order).div_(M)], 1).view(-1)
    part_start = N * torch.arange(2 * B, device=dev).view(B, 2, 1)
    offsets = torch.cat([(edges.unsqueeze(1) + part_start).view(-1),
                         torch.tensor([2 * B * N], device=dev)])
    h = F.embedding_bag(index, dy.view(B * N, dv), offsets, mode="sum",
                        include_last_offset=True, per_sample_weights=weights)
    R = torch.empty(B, 2, M, dv, dtype=cdt, device=dev)
    _cumsum_rows(h.view(2 * B, M + 1, dv)[:, 1:], out=R.view(2 * B, M, dv), reverse=True)
    return R


def _pg_rows(k: torch.Tensor, M: int) -> torch.Tensor:
    """Rows of P_g[k] in P.view(-1, dv) for P (B, M + 1, 2, dv): 2 (b (M + 1) + k)."""
    B = k.shape[0]
    return 2 * (k + (M + 1) * torch.arange(B, device=k.device).unsqueeze(1))


def _rows_dot(table: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out[n] = table[index[n]] . x[n] for x (n, w) contiguous, table (L, w) contiguous, without
    materialising the gathered rows: the per-sample-weight gradient of embedding_bag with one
    row per bag is exactly this gather-and-dot, in one pass."""
    n = index.shape[0]
    bags = torch.arange(n, device=index.device)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x, table, index, bags, bags, 0, -1)  # mode 0 = sum, no padding index


_use_compiled_concat = True


@functools.lru_cache(maxsize=None)
def _compiled_concat_built() -> bool:
    from .. import ops
    names = [f"{ops.NAMESPACE}::concat_{s}" for s in ("sorted_fwd", "sorted_bwd", "project")]
    return ops._C is not None and all(
        ops._op_exists(n) and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
        for n in names)


def compiled_concat_available(device: torch.device) -> bool:
    """Whether concatenation on this device runs the fused C++ kernels (CPU, extension built,
    not switched off by :func:`use_compiled_concat`)."""
    return _use_compiled_concat and device.type == "cpu" and _compiled_concat_built()


@contextlib.contextmanager
def use_compiled_concat(enabled: bool) -> Iterator[None]:
    """Switch the fused C++ concatenation kernels off (False) or back on (tests, benchmarks);
    off, CPU calls run the pure-PyTorch version of the same algorithm."""
    global _use_compiled_concat
    outer, _use_compiled_concat = _use_compiled_concat, bool(enabled)
    try:
        yield
    finally:
        _use_compiled_concat = outer


def _concat_pytorch_fwd(theta, phi, g, w):
    B, N, dk = theta.shape
    M, dv = g.shape[1:]
    cdt = _compute_dtype(theta.dtype)
    wc = w.to(cdt)
    a = _project(theta, wc[:dk])  # (B, N)
    # Keys by decreasing b: {j : a_i + b_j > 0} = {j : -b_j < a_i} is a prefix of length k_i.
    neg_b_sorted, perm = torch.sort(_project(phi, wc[dk:]).neg_(), dim=1)
    k = torch.searchsorted(neg_b_sorted, a)  # left: #{j : -b_j < a_i}, strict
    P, _ = _key_prefix_sums(g, perm, neg_b_sorted.neg(), cdt)  # (B, M + 1, 2, dv)
    # y_i = (P_bg[k_i] + a_i P_g[k_i]) / M: one embedding_bag over bags of two rows of P
    # (row 2 r of P's (., dv) view is P_g[r], row 2 r + 1 is P_bg[r]).
    k2 = _pg_rows(k, M)
    index = torch.stack([k2 + 1, k2], -1).view(-1)
    weights = torch.stack([torch.full_like(a, 1.0 / M), a / M], -1).view(-1)
    offsets = torch.arange(0, 2 * B * N, 2, device=k.device)
    y = F.embedding_bag(index, P.view(-1, dv), offsets, mode="sum",
                        per_sample_weights=weights).view(B, N, dv)
    return y.to(theta.dtype), a, neg_b_sorted, perm, k, P


def _concat_pytorch_bwd(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P):
    B, N, dk = theta.shape
    M, dv = g.shape[1:]
    cdt = a.dtype
    wc = w.to(cdt)
    dy = dy.to(cdt).reshape(B, N, dv)  # rows contiguous (a copy only if they were not)
    if not dy.is_contiguous():
        dy = dy.contiguous()
    # da_i = dy_i . P_g[k_i] / M
    rows = P.view(-1, dv)
    flat_dy, flat_k = dy.view(B * N, dv), _pg_rows(k, M).view(-1)
    da = torch.empty(B * N, dtype=cdt, device=a.device)
    for n0, n1 in _row_chunks(B * N, dv, a.device):
        da[n0:n1] = _rows_dot(rows, flat_k[n0:n1], flat_dy[n0:n1])
    da = da.div_(M).view(B, N)
    R = _query_sums_by_key(dy, a, k, M, cdt)  # (B, 2, M, dv), keys by decreasing b
    # Key j sits at position inv[j] of perm. Gathers with inv, not scatters: deterministic on
    # CUDA too.
    inv = torch.argsort(perm, dim=1)  # (B, M)
    # dg_j = (b_j sum dy_i + sum a_i dy_i) / M over the queries i with a_i + b_j > 0
    dg_sorted = torch.addcmul(R[:, 1], R[:, 0], neg_b_sorted.neg().unsqueeze(-1))
    dg = torch.empty_like(g)  # g's strides: no layout copy in autograd
    _copy_rows(dg, _rows(dg_sorted, inv))
    del dg_sorted
    # db_j = g_j . (sum dy_i) / M
    db = torch.gather(torch.linalg.vecdot(R[:, 0], _rows(g.to(cdt), perm)), 1, inv)
    del R
    dtheta = torch.empty_like(theta)  # theta's strides: no layout copy in autograd
    torch.mul(da.unsqueeze(-1), wc[:dk], out=dtheta)
    dphi = torch.empty_like(phi)
    torch.mul(db.unsqueeze(-1), wc[dk:], out=dphi)
    dw = torch.cat([_weight_grad(da, theta), _weight_grad(db, phi)]).to(w.dtype)
    return dtheta, dphi, dg, dw


def _concat_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, L, dk) @ (dk,) -> (B, L), contiguous, by the C++ op (summed in float64)."""
    return ops.run_op(torch.ops.nonlocal_kernels.concat_project.default, x, w)


def _concat_compiled_fwd(theta, phi, g, w):
    dk = theta.shape[2]
    cdt = _compute_dtype(theta.dtype)
    wc = w.to(cdt)
    a = _concat_project(theta.to(cdt), wc[:dk].contiguous())  # (B, N)
    neg_b_sorted, perm = torch.sort(_concat_project(phi.to(cdt), wc[dk:].contiguous()).neg_(),
                                    dim=1)
    y, P, k = ops.run_op(torch.ops.nonlocal_kernels.concat_sorted_fwd.default, a, neg_b_sorted,
                         perm, g.to(cdt))
    return y.to(theta.dtype), a, neg_b_sorted, perm, k, P


def _concat_compiled_bwd(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P):
    B, N, _ = theta.shape
    cdt = a.dtype
    dy = dy.to(cdt).reshape(B, N, g.shape[2]).contiguous()
    dtheta, dphi, dg, dw = ops.run_op(
        torch.ops.nonlocal_kernels.concat_sorted_bwd.default, dy, a, k, P, neg_b_sorted, perm,
        g.to(cdt), theta.to(cdt), phi.to(cdt), w.to(cdt).contiguous())
    return dtheta.to(theta.dtype), dphi.to(phi.dtype), dg.to(g.dtype), dw.to(w.dtype)


def _concat_fwd(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, w: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor]:
    """(y, a, neg_b_sorted, perm, k, P): y = (1/M) sum_j ReLU(a_i + b_j) g_j with
    a = theta w[:dk], b = phi w[dk:], and what the backward needs: a (B, N), -b sorted and its
    permutation (B, M), k_i = #{j : a_i + b_j > 0} (B, N), the key prefix sums P (B, M+1, 2, dv).
    On CPU with the extension built: the C++ kernels (csrc/fast/concat_sorted.cpp)."""
    _note("concatenation", "sorted")
    impl = _concat_compiled_fwd if compiled_concat_available(theta.device) else _concat_pytorch_fwd
    return impl(theta, phi, g, w)


concat_fwd_op = torch.library.custom_op(f"{FAST_NS}::concat_fwd", mutates_args=())(_concat_fwd)


@concat_fwd_op.register_fake
def _(theta, phi, g, w):
    B, N, _ = theta.shape
    M, dv = g.shape[1:]
    cdt = _compute_dtype(theta.dtype)
    return (theta.new_empty((B, N, dv)), theta.new_empty((B, N), dtype=cdt),
            theta.new_empty((B, M), dtype=cdt), theta.new_empty((B, M), dtype=torch.long),
            theta.new_empty((B, N), dtype=torch.long),
            theta.new_empty((B, M + 1, 2, dv), dtype=cdt))


def _concat_bwd(dy: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                w: torch.Tensor, a: torch.Tensor, neg_b_sorted: torch.Tensor,
                perm: torch.Tensor, k: torch.Tensor, P: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dtheta, dphi, dg, dw) of concat_fwd's y, the first three laid out like their inputs."""
    impl = _concat_compiled_bwd if compiled_concat_available(theta.device) else _concat_pytorch_bwd
    return impl(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P)


concat_bwd_op = torch.library.custom_op(f"{FAST_NS}::concat_bwd", mutates_args=())(_concat_bwd)


@concat_bwd_op.register_fake
def _(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P):
    return (torch.empty_like(theta), torch.empty_like(phi), torch.empty_like(g),
            torch.empty_like(w))


def _concat_fwd_vmap(fn):
    """A vmap rule for concat_fwd (or Concatenation.apply): theta, phi, g fold into the batch;
    w (2 dk,) is shared by the batch, so a vmapped w runs fn once per slice."""
    def rule(info, in_dims, theta, phi, g, w):
        if in_dims[3] is not None:
            return ops.vmap_by_loop(fn)(info, in_dims, theta, phi, g, w)
        folded = ops.fold_batch(info, in_dims[:3], (theta, phi, g))
        return ops.unfold_batch(fn(*folded, w), info.batch_size)
    return rule


def _concat_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[-4:], *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _concat_grads(bwd, ctx, dy):
    if dy is None:
        return None, None, None, None
    return bwd(dy, *ctx.saved_tensors)


def _register_concat():
    concat_fwd_op.register_vmap(_concat_fwd_vmap(concat_fwd_op))
    # dw sums over the batch, so the backward cannot fold a vmapped dim into it.
    concat_bwd_op.register_vmap(ops.vmap_by_loop(concat_bwd_op))
    concat_fwd_op.register_autograd(
        lambda ctx, dy, *rest: _concat_grads(concat_bwd_op, ctx, dy),
        setup_context=_concat_setup)

    def refuse(ctx, *grads):
        raise ops.double_backward_error(f"{FAST_NS}::concat_bwd")
    concat_bwd_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


_register_concat()


def _register_concat_project():
    """The fake and the refused autograd of the C++ nonlocal_kernels::concat_project (the
    concat_sorted ops have theirs in ops.py)."""
    name = f"{ops.NAMESPACE}::concat_project"
    if ops._C is None or not ops._op_exists(name):
        return

    def fake(x, w):
        return x.new_empty(x.shape[:2])

    def refuse(ctx, *grads):
        raise RuntimeError("nonlocal_kernels::concat_project is a CPU kernel inside backend "
                           "'fast' and has no autograd of its own: differentiate through "
                           "nonlocal_attention(..., mode='concatenation')")

    torch.library.register_fake(ops.op(name), fake)
    torch.library.register_autograd(ops.op(name), refuse,
                                    setup_context=lambda ctx, inputs, output: None)


_register_concat_project()


@ops.fast_apply
class ConcatenationBackward(torch.autograd.Function):
    """``apply(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P)``: concat_bwd, whose own
    backward raises (no second derivative)."""

    @staticmethod
    def forward(dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P):
        return ops.run_op(concat_bwd_op, dy, theta, phi, g, w, a, neg_b_sorted, perm, k, P,
                          impl=_concat_bwd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise ops.double_backward_error("backend 'fast' (mode 'concatenation')")

    @staticmethod
    def vmap(info, in_dims, *args):
        return ops.vmap_by_loop(ConcatenationBackward.apply)(info, in_dims, *args)


@ops.fast_apply
class Concatenation(torch.autograd.Function):
    """``apply(theta, phi, g, w) -> (y, ...)`` through the concat ops, for torch.func (see
    ops.py); its backward is :class:`ConcatenationBackward`."""

    @staticmethod
    def forward(theta, phi, g, w):
        return ops.run_op(concat_fwd_op, theta, phi, g, w, impl=_concat_fwd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _concat_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy, *rest):
        if not torch.is_grad_enabled():  # no graph to record: the op alone
            return _concat_grads(lambda *a: ops.run_op(concat_bwd_op, *a, impl=_concat_bwd),
                                 ctx, dy)
        return _concat_grads(ConcatenationBackward.apply, ctx, dy)

    @staticmethod
    def vmap(info, in_dims, theta, phi, g, w):
        return _concat_fwd_vmap(Concatenation.apply)(info, in_dims, theta, phi, g, w)


def concatenation(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                  concat_weight: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_j ReLU(theta_i.w_theta + phi_j.w_phi) g_j by sorting; O((N+M)·d) memory."""
    return Concatenation.apply(theta, phi, g, concat_weight)[0]


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    if MODES[mode].family == "dot_product":
        return dot_product(theta, phi, g)
    return concatenation(theta, phi, g, concat_weight)


BACKEND = register(Backend(
    name="fast",
    description="exact reorderings, O((N+M)·d) memory: dot_product as theta (phi^T g) / M "
                "(or theta phi^T first when that needs fewer FLOPs); concatenation by sorting "
                "phi·w_phi with prefix sums and binary search",
    families=("dot_product", "concatenation"),
    dtypes=FLOAT_DTYPES,
    devices=("cpu", "cuda"),
    run=_run,
    priority=200,
    double_backward=("dot_product",),
    ops=tuple(f"{FAST_NS}::{n}" for n in ("dot_product", "dot_product_bwd", "concat_fwd",
                                           "concat_bwd"))
    + (() if ops._C is None else tuple(f"{ops.NAMESPACE}::concat_{n}"
                                       for n in ("sorted_fwd", "sorted_bwd", "project"))),
))
