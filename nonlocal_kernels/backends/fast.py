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
  backward = da + per-k bins + suffix sums (in float64) + dg + db; the projections and their
  gradients stay PyTorch ops. On this 2-core dev VM they take I3D res3 forward+backward from
  about 8 ms to about 4-5 ms (benchmarks/results/fast-paths-2026-11-24.md).
  :func:`use_compiled_concat` switches them off (the pure-PyTorch version above then runs).

Precision: a, b and every sum are computed in float32 from float16/bfloat16 inputs (float64 for
float64 inputs) and the results are rounded to the input dtype at the end. The pure-PyTorch da
runs in row chunks (which bound per-call temporaries at long-video sizes).

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
        P, x = _key_prefix_sums(g, perm_b, b_sorted, cdt)  # (B, M+1, 2, dv), (B, M, 2, dv)
        # y_i = (P_bg[k_i] + a_i P_g[k_i]) / M: one embedding_bag over bags of two rows of P
        # (row 2 r of P's (., dv) view is P_g[r], row 2 r + 1 is P_bg[r]).
        k2 = _pg_rows(k, M)
        index = torch.stack([k2 + 1, k2], -1).view(-1)
        weights = torch.stack([torch.full_like(a, 1.0 / M), a / M], -1).view(-1)
        offsets = torch.arange(0, 2 * B * N, 2, device=k.device)
        y = F.embedding_bag(index, P.view(-1, dv), offsets, mode="sum",
                            per_sample_weights=weights).view(B, N, dv).to(dtype)
        ctx.save_for_backward(theta, phi, g, w, a, b_sorted, perm_b, k, P, x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        theta, phi, g, w, a, b_sorted, perm_b, k, P, x = ctx.saved_tensors
        B, N, dk = theta.shape
        M, dv = g.shape[1:]
        cdt = a.dtype
        need_t, need_p, need_g, need_w = ctx.needs_input_grad
        need_da = need_t or need_w
        need_db = need_p or need_w
        wc = w.to(cdt)
        dtheta = dphi = dg = dw = da = db = None
        dy = dy.to(cdt).reshape(B, N, dv)  # rows contiguous (a copy only if they were not)
        if not dy.is_contiguous():
            dy = dy.contiguous()

        if need_da:  # da_i = dy_i . P_g[k_i] / M
            rows = P.view(-1, dv)
            flat_dy, flat_k = dy.view(B * N, dv), _pg_rows(k, M).view(-1)
            da = torch.empty(B * N, dtype=cdt, device=a.device)
            for n0, n1 in _row_chunks(B * N, dv, a.device):
                da[n0:n1] = _rows_dot(rows, flat_k[n0:n1], flat_dy[n0:n1])
            da = da.div_(M).view(B, N)
        if need_db or need_g:
            R = _query_sums_by_key(dy, a, k, M, cdt)  # (B, 2, M, dv), keys by decreasing b
            # Key j sits at position inv[j] of perm_b. Gathers with inv, not scatters:
            # deterministic on CUDA too.
            inv = torch.argsort(perm_b, dim=1)  # (B, M)
            if need_g:  # dg_j = (b_j sum dy_i + sum a_i dy_i) / M over i with a_i + b_j > 0
                dg_sorted = torch.addcmul(R[:, 1], R[:, 0], b_sorted.unsqueeze(-1))
                dg = torch.empty_like(g)  # g's strides: no layout copy in autograd
                _copy_rows(dg, _rows(dg_sorted, inv))
                del dg_sorted
            if need_db:  # db_j = g_j . (sum dy_i) / M  (x[:, :, 0] holds g by decreasing b)
                db = torch.gather(torch.linalg.vecdot(R[:, 0], x[:, :, 0]), 1, inv)
            del R
        if need_t:
            dtheta = torch.empty_like(theta)  # theta's strides: no layout copy in autograd
            torch.mul(da.unsqueeze(-1), wc[:dk], out=dtheta)
        if need_p:
            dphi = torch.empty_like(phi)
            torch.mul(db.unsqueeze(-1), wc[dk:], out=dphi)
        if need_w:
            dw = torch.cat([_weight_grad(da, theta), _weight_grad(db, phi)]).to(w.dtype)
        return dtheta, dphi, dg, dw


class _ConcatSortedCompiled(torch.autograd.Function):
    """The same algorithm with the key prefix sums, binary search and output rows (forward) and
    da, the bins, their suffix sums, dg, db and the projections' gradients (backward) each fused
    into one C++ CPU kernel (csrc/fast/concat_sorted.cpp); the projections and the sort of b
    stay PyTorch ops."""

    @staticmethod
    def forward(ctx, theta, phi, g, w):
        dk = theta.shape[2]
        dtype, cdt = theta.dtype, _compute_dtype(theta.dtype)
        wc = w.to(cdt)
        a = _project(theta, wc[:dk]).contiguous()  # (B, N)
        neg_b_sorted, perm_b = torch.sort(_project(phi, wc[dk:]).neg_(), dim=1)
        y, P, k = torch.ops.nonlocal_kernels.concat_sorted_fwd(a, neg_b_sorted, perm_b,
                                                               g.to(cdt))
        ctx.save_for_backward(theta, phi, g, w, a, neg_b_sorted, perm_b, k, P)
        return y.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        theta, phi, g, w, a, neg_b_sorted, perm_b, k, P = ctx.saved_tensors
        B, N, dk = theta.shape
        cdt = a.dtype
        need_t, need_p, need_g, need_w = ctx.needs_input_grad
        dy = dy.to(cdt).reshape(B, N, g.shape[2]).contiguous()
        dtheta, dphi, dg, dw = torch.ops.nonlocal_kernels.concat_sorted_bwd(
            dy, a, k, P, neg_b_sorted, perm_b, g.to(cdt), theta.to(cdt), phi.to(cdt),
            w.to(cdt).contiguous())
        dtheta = dtheta.to(theta.dtype) if need_t else None
        dphi = dphi.to(phi.dtype) if need_p else None
        dw = dw.to(w.dtype) if need_w else None
        return dtheta, dphi, dg.to(g.dtype) if need_g else None, dw


_use_compiled_concat = True


@functools.lru_cache(maxsize=None)
def _compiled_concat_built() -> bool:
    from .. import ops
    names = [f"{ops.NAMESPACE}::concat_sorted_{s}" for s in ("fwd", "bwd")]
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


def concatenation(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor,
                  concat_weight: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_j ReLU(theta_i.w_theta + phi_j.w_phi) g_j by sorting; O((N+M)·d) memory."""
    _note("concatenation", "sorted")
    fn = _ConcatSortedCompiled if compiled_concat_available(theta.device) else _ConcatSorted
    return fn.apply(theta, phi, g, concat_weight)


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
