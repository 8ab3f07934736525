"""Backend ``fast``: exact reorderings of the dot_product and concatenation modes.

Both modes have algebraic shortcuts that never form the N x M affinity. Written with PyTorch ops
(bmm, sort, searchsorted, embedding_bag, cumsum / triangular matmul, index_select), so they run
on CPU and CUDA tensors alike, as autograd.Functions with explicit backward passes.

dot_product, y = (theta phi^T) g / M:
  - "reordered": y = theta (phi^T g / M). Forward 2·dk·dv·(N+M) FLOPs, a (dk, dv) intermediate.
    Backward dtheta = dy K^T with K = phi^T g / M; dK = theta^T dy / M; dphi = g dK^T; dg = phi dK.
  - "naive": S = theta phi^T (N x M), y = S g / M. Forward 2·N·M·(dk+dv) FLOPs.
  Each call takes the path with fewer FLOPs (backward has the same ratio as forward). "naive" is
  only taken when N·M·(dk+dv) < dk·dv·(N+M), which implies N·M < min(dk, dv)·(N+M): its N x M
  matrix is then no bigger than the inputs, so memory stays O((N+M)·d) either way.

concatenation, y_i = (1/M) sum_j ReLU(a_i + b_j) g_j with a = theta·w_theta, b = phi·w_phi:
  query i reaches exactly the keys with -b_j < a_i, i.e. the k_i keys of largest b, where
  k_i = searchsorted(sort(-b), a_i) (strict "<": a pair with a_i + b_j exactly 0 contributes
  nothing and gets ReLU's gradient 0, as in PyTorch; ties in a or b need nothing special).
  With prefix sums P_g, P_bg of g/M and b·g/M over the keys by decreasing b,
      y_i = P_bg[k_i] + a_i · P_g[k_i]        (one embedding_bag over P's rows).
  Backward, the symmetric sort over a: key j of ascending rank s is reached by the queries with
  k_i >= M - s, i.e. those of largest a. Sorting the queries by k (= by a) makes each value of
  k a contiguous bag; one embedding_bag sums dy_i and a_i·dy_i per bag, prefix sums over the
  bags give S_dy(j) and S_ady(j), and
      dg_j = (b_j · S_dy(j) + S_ady(j)) / M,   db_j = g_j · S_dy(j) / M,   da_i = dy_i · P_g[k_i],
      dtheta = da w_theta^T, dphi = db w_phi^T, dw = [sum_i da_i theta_i, sum_j db_j phi_j].
  O((N+M)·(log + d)) time, O((N+M)·d) memory; deterministic (no atomics, no scatters).
  CPU prefix sums are blocked triangular products (torch.cumsum along a non-last dim is
  several times slower here); CUDA uses torch.cumsum.

Precision: a, b and every sum are computed in float32 from float16/bfloat16 inputs (float64 for
float64 inputs) and the results are rounded to the input dtype at the end. The one N x dv
scratch gather (da) runs in row chunks that bound it at long-video sizes.

Debug hook: :func:`last_path` / :func:`record_paths` say which path a call took ("reordered",
"naive" or "sorted"); :func:`force_dot_product_path` overrides the cost model (tests,
benchmarks). The hook state is process-global and not thread-safe (it is a debugging aid).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .registry import FLOAT_DTYPES, Backend, register

DOT_PATHS = ("reordered", "naive")

# Scratch work over the N query rows (the gather in da) runs in chunks of about this many
# elements, which bounds the temporary at long-video sizes (4 MB on CPU; on CUDA 64 MB, few
# launches). Smaller CPU chunks were measured slower here (per-op overhead).
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_OTHER = 1 << 24

_last_path: Optional[str] = None
_records: Optional[list] = None
_forced_dot_path: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Debug hook and cost model
# ---------------------------------------------------------------------------------------------

def last_path() -> Optional[str]:
    """The path taken by the most recent call of this backend (None before the first)."""
    return _last_path


@contextlib.contextmanager
def record_paths() -> Iterator[list]:
    """Collect (mode, path) for every call of this backend inside the ``with`` block."""
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


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


def _note(mode: str, path: str) -> None:
    global _last_path
    _last_path = path
    if _records is not None:
        _records.append((mode, path))


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
# dot_product
# ---------------------------------------------------------------------------------------------

class _DotReordered(torch.autograd.Function):
    """y = theta (phi^T g / M); never forms N x M."""

    @staticmethod
    def forward(ctx, theta, phi, g):
        cdt = _compute_dtype(theta.dtype)
        M = phi.shape[1]
        K = torch.bmm(phi.to(cdt).transpose(1, 2), g.to(cdt)).div_(M)  # (B, dk, dv)
        y = torch.bmm(theta.to(cdt), K)
        ctx.save_for_backward(theta, phi, g, K)
        return y.to(theta.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        theta, phi, g, K = ctx.saved_tensors
        cdt, M = K.dtype, phi.shape[1]
        dy = dy.to(cdt)
        dtheta = dphi = dg = None
        if ctx.needs_input_grad[0]:
            dtheta = _mm(dy, K.transpose(1, 2), theta)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dK = torch.bmm(theta.to(cdt).transpose(1, 2), dy).div_(M)  # (B, dk, dv)
            if ctx.needs_input_grad[1]:
                dphi = _mm(g.to(cdt), dK.transpose(1, 2), phi)
            if ctx.needs_input_grad[2]:
                dg = _mm(phi.to(cdt), dK, g)
        return dtheta, dphi, dg


class _DotNaive(torch.autograd.Function):
    """S = theta phi^T, y = S g / M; saves only the inputs (S is recomputed in backward)."""

    @staticmethod
    def forward(ctx, theta, phi, g):
        cdt = _compute_dtype(theta.dtype)
        M = phi.shape[1]
        S = torch.bmm(theta.to(cdt), phi.to(cdt).transpose(1, 2))  # (B, N, M)
        y = torch.bmm(S, g.to(cdt)).div_(M)
        ctx.save_for_backward(theta, phi, g)
        return y.to(theta.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        theta, phi, g = ctx.saved_tensors
        cdt, M = _compute_dtype(theta.dtype), phi.shape[1]
        t, p, v = theta.to(cdt), phi.to(cdt), g.to(cdt)
        dy = dy.to(cdt)
        dtheta = dphi = dg = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dS = torch.bmm(dy, v.transpose(1, 2)).div_(M)  # (B, N, M)
            if ctx.needs_input_grad[0]:
                dtheta = _mm(dS, p, theta)
            if ctx.needs_input_grad[1]:
                dphi = _mm(dS.transpose(1, 2), t, phi)
            del dS
        if ctx.needs_input_grad[2]:
            S = torch.bmm(t, p.transpose(1, 2)).div_(M)
            dg = _mm(S.transpose(1, 2), dy, g)
        return dtheta, dphi, dg


def dot_product(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, N, dk), (B, M, dk), (B, M, dv) -> (theta phi^T) g / M by the cheaper exact path."""
    N, dk = theta.shape[1:]
    M, dv = g.shape[1:]
    path = choose_dot_product_path(N, M, dk, dv)
    _note("dot_product", path)
    fn = _DotReordered if path == "reordered" else _DotNaive
    return fn.apply(theta, phi, g)


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


def _cumsum_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (B, L, W) = inclusive prefix sums of x along dim 1 (out's rows contiguous).

    CUDA: torch.cumsum. CPU: torch.cumsum along a non-last dim runs about 3-7 ns per element
    here, so the scan is blocked: prefix sums inside blocks of _SCAN_BLOCK rows as one batched
    product with a lower-triangular matrix of ones (plain adds in x's dtype; CPU matmul has no
    TF32), then the running block totals (a short cumsum) added to each block.
    """
    if x.device.type != "cpu":
        return torch.cumsum(x, 1, out=out)
    B, L, W = x.shape
    T = _SCAN_BLOCK
    nb, L0 = L // T, (L // T) * T
    tri = _lower_ones(T, x.dtype)
    if nb:
        yb = out[:, :L0].view(B, nb, T, W)
        torch.matmul(tri, x[:, :L0].reshape(B, nb, T, W), out=yb)
        if nb > 1:
            yb[:, 1:] += torch.cumsum(yb[:, :-1, -1], 1).unsqueeze(2)
    if L > L0:
        r = L - L0
        torch.matmul(tri[:r, :r], x[:, L0:], out=out[:, L0:])
        if nb:
            out[:, L0:] += out[:, L0 - 1:L0]
    return out


@functools.lru_cache(maxsize=None)
def _lower_ones(T: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(T, T, dtype=dtype).tril_()


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
    """(P, xg): xg (B, M, dv) = g[perm] / M in cdt (keys by decreasing b; a view of a buffer
    twice its size); P (B, 2, M + 1, dv) in cdt with P[:, 0, r] = sum of the first r rows of
    xg and P[:, 1, r] the same for b_sorted * xg; P[:, :, 0] = 0. The two halves are separate
    contiguous blocks (row gathers from a strided half are several times slower)."""
    B, M, dv = g.shape
    x = torch.empty(B, 2, M, dv, dtype=cdt, device=g.device)
    xg = x[:, 0]
    for i in range(B):
        if g.dtype == cdt:
            torch.index_select(g[i], 0, perm[i], out=xg[i])
        else:
            xg[i] = g[i].index_select(0, perm[i])
    xg.div_(M)
    torch.mul(xg, b_sorted.unsqueeze(-1), out=x[:, 1])
    P = torch.empty(B, 2, M + 1, dv, dtype=cdt, device=g.device)
    P[:, :, 0].zero_()
    _cumsum_rows(x.view(2 * B, M, dv), out=P.view(2 * B, M + 1, dv)[:, 1:])
    return P, xg


def _query_sums_by_key(dy: torch.Tensor, a: torch.Tensor, k: torch.Tensor, M: int,
                       cdt: torch.dtype) -> tuple:
    """(R_dy, R_ady), each (B, M, dv) in cdt: row s holds the sum of dy_i (of a_i dy_i) over
    the queries i with k_i >= M - s, i.e. what the key of ascending-b rank s (descending rank
    M - 1 - s) receives: query i reaches the k_i keys of largest b.

    Query i goes to bin M - k_i; sorting the queries by bin makes each bin a contiguous bag, and
    one embedding_bag call sums every bag (deterministic, no atomics, multithreaded on CPU);
    prefix sums over the bins then give R.
    """
    B, N, dv = dy.shape
    dev = dy.device
    k_desc, order = torch.sort(k, dim=1, descending=True)  # bins M - k ascending
    # Bag c of batch b: positions [start(b, c), start(b, c + 1)) of the sorted queries.
    edges = torch.searchsorted(k_desc.neg(), torch.arange(-M, 1, device=dev).expand(B, M + 1)
                               .contiguous())  # #{i : k_i > M - c} = start of bin c
    # Bags (b, c) for the sums of dy, then bags (b, c) again for the sums of a_i dy_i: the same
    # rows of dy, the second time weighted by a.
    base = torch.arange(B, device=dev).unsqueeze(1) * N
    starts = (edges + base).view(-1)
    offsets = torch.cat([starts, starts + B * N, torch.tensor([2 * B * N], device=dev)])
    index = (order + base).view(-1).repeat(2)
    weights = torch.cat([torch.ones(B * N, dtype=cdt, device=dev),
                         torch.gather(a, 1, order).view(-1)])
    h = F.embedding_bag(index, dy.reshape(B * N, dv).to(cdt), offsets, mode="sum",
                        include_last_offset=True, per_sample_weights=weights)
    R = _cumsum_rows(h.view(2 * B, M + 1, dv)[:, :M],
                     out=torch.empty(2, B, M, dv, dtype=cdt, device=dev).view(2 * B, M, dv))
    return R.view(2, B, M, dv).unbind(0)


class _ConcatSorted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, phi, g, w):
        B, N, dk = theta.shape
        M, dv = g.shape[1:]
        dtype, cdt = theta.dtype, _compute_dtype(theta.dtype)
        wc = w.to(cdt)
        a = _project(theta, wc[:dk])  # (B, N)
        b = _project(phi, wc[dk:])  # (B, M)
        # Keys by decreasing b: {j : a_i + b_j > 0} = {j : -b_j < a_i} is a prefix of length k_i.
        neg_b_sorted, perm_b = torch.sort(-b, dim=1)
        k = torch.searchsorted(neg_b_sorted, a)  # left: #{j : -b_j < a_i}, strict
        b_sorted = neg_b_sorted.neg_()
        P, xg = _key_prefix_sums(g, perm_b, b_sorted, cdt)  # (B, 2, M+1, dv), holds the 1/M
        # y_i = P_bg[k_i] + a_i P_g[k_i]: one embedding_bag over bags of two rows of P.
        base = torch.arange(B, device=k.device).view(B, 1, 1) * (2 * (M + 1))
        index = (torch.stack([k + (M + 1), k], -1) + base).view(-1)
        weights = torch.stack([torch.ones_like(a), a], -1).view(-1)
        offsets = torch.arange(0, 2 * B * N, 2, device=k.device)
        y = F.embedding_bag(index, P.view(-1, dv), offsets, mode="sum",
                            per_sample_weights=weights).view(B, N, dv).to(dtype)
        ctx.save_for_backward(theta, phi, g, w, a, b_sorted, perm_b, k, P, xg)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        theta, phi, g, w, a, b_sorted, perm_b, k, P, xg = ctx.saved_tensors
        B, N, dk = theta.shape
        M, dv = xg.shape[1:]
        dtype, cdt = theta.dtype, a.dtype
        need_t, need_p, need_g, need_w = ctx.needs_input_grad
        need_da = need_t or need_w
        need_db = need_p or need_w
        wc = w.to(cdt)
        dtheta = dphi = dg = dw = da = db = None

        if need_da:  # da_i = dy_i . P_g[k_i]  (P holds the 1/M)
            da = torch.empty(B, N, dtype=cdt, device=a.device)
            for i in range(B):
                for n0, n1 in _row_chunks(N, dv, a.device):
                    G = P[i, 0].index_select(0, k[i, n0:n1]).mul_(dy[i, n0:n1])
                    torch.sum(G, -1, out=da[i, n0:n1])
                    del G
        if need_db or need_g:
            R_dy, R_ady = _query_sums_by_key(dy, a, k, M, cdt)  # by ascending-b rank
            # Key j has ascending rank rank[j] (perm_b sorts b descending). Gathers with the
            # inverse permutation, not scatters: deterministic on CUDA too.
            rank = torch.argsort(perm_b.flip(1), dim=1)
            if need_g:  # dg_j = (b_j sum dy_i + sum a_i dy_i) / M over i with a_i + b_j > 0
                dg_asc = torch.addcmul(R_ady, R_dy, b_sorted.flip(1).unsqueeze(-1)).div_(M)
                dg = torch.empty_like(g)  # g's strides: no layout copy in autograd
                dg.copy_(_rows(dg_asc, rank))
                del dg_asc
            if need_db:  # db_j = g_j . (sum dy_i) / M  (xg holds g / M)
                db = torch.gather(R_dy.mul_(xg.flip(1)).sum(-1), 1, rank)
            del R_dy, R_ady
        if need_t:
            dtheta = torch.empty_like(theta)  # theta's strides: no layout copy in autograd
            torch.mul(da.unsqueeze(-1), wc[:dk], out=dtheta)
        if need_p:
            dphi = torch.empty_like(phi)
            torch.mul(db.unsqueeze(-1), wc[dk:], out=dphi)
        if need_w:
            dw = torch.cat([_weight_grad(da, theta), _weight_grad(db, phi)]).to(w.dtype)
        return dtheta, dphi, dg, dw


def concatenation(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                  concat_weight: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_j ReLU(theta_i.w_theta + phi_j.w_phi) g_j by sorting; O((N+M)·d) memory."""
    _note("concatenation", "sorted")
    return _ConcatSorted.apply(theta, phi, g, concat_weight)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def _run(theta, phi, g, *, mode, scale, concat_weight, return_lse):
    if return_lse:  # functional.py already rejects this; kept for direct callers
        raise ValueError(f"return_lse: only the softmax modes have an lse, not {mode!r}")
    if mode == "dot_product":
        return dot_product(theta, phi, g)
    if mode == "concatenation":
        return concatenation(theta, phi, g, concat_weight)
    raise ValueError(f"mode: backend 'fast' supports dot_product and concatenation, not {mode!r}")


BACKEND = register(Backend(
    name="fast",
    description="exact reorderings, O((N+M)·d) memory: dot_product as theta (phi^T g) / M "
                "(or theta phi^T first when that needs fewer FLOPs); concatenation by sorting "
                "phi·w_phi with prefix sums and binary search",
    modes=("dot_product", "concatenation"),
    dtypes=FLOAT_DTYPES,
    devices=("cpu", "cuda"),
    run=_run,
    priority=200,
))
