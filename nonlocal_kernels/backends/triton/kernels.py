"""Triton kernels for the softmax family (docs/design.md section 4).

    y = softmax_rows(scale * theta phi^T) g,   lse_i = logsumexp_j(scale * theta_i . phi_j)

Every tensor comes with its own strides (channels-first views are read in place) and every
offset is computed in int64. Shapes (B, N, dk), (B, M, dk), (B, M, dv); program_id(0) walks the
row tiles of one batch element, then the next batch element (no 65535 limit on B), and
program_id(1) is a "part": a slice of the output columns (dv for y and dg, dk for dphi and
dtheta) when a head dim is larger than what one program keeps in registers.

Block sizes (all tl.constexpr, chosen by the launchers in launch.py):
  BLOCK_M  query rows per tile, BLOCK_N key rows per tile,
  BLOCK_K  dk chunk: S = theta phi^T is accumulated over NUM_K = cdiv(dk, BLOCK_K) chunks, and
           the dphi / dtheta outputs are written in chunks of BLOCK_K columns (one per part),
  BLOCK_V  dv chunk: y and dg are written in chunks of BLOCK_V columns (one per part), and
           dP = dy g^T is accumulated over NUM_V = cdiv(dv, BLOCK_V) chunks.
When NUM_K == 1 (resp. NUM_V == 1) the program loads its own theta/phi (resp. dy/g) tile once,
outside the loop over the other side's tiles.

Numerics: dot products accumulate in float32; probabilities use exp2 with log2(e) folded into
``qk_scale = scale * log2(e)``; P and dS are rounded to the input dtype before the second dot
product (as FlashAttention does); IEEE selects exact float32 dot products (else tf32 for float32
inputs; 16-bit inputs always use their tensor-core path).
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(base, rows, cols, s_row, s_col, n_rows, n_cols):
    """base[rows, cols] (int64 offsets), zero outside rows < n_rows and cols < n_cols."""
    r = rows.to(tl.int64)
    c = cols.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + r[:, None] * s_row + c[None, :] * s_col, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, val, rows, cols, s_row, s_col, n_rows, n_cols):
    r = rows.to(tl.int64)
    c = cols.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + r[:, None] * s_row + c[None, :] * s_col, val, mask=mask)


@triton.jit
def _scores(a_base, s_an, s_ak, a_rows, n_a, b_base, s_bn, s_bk, b_rows, n_b, a_hold, DK,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
            NUM_K: tl.constexpr, IEEE: tl.constexpr):
    """a[a_rows, :] . b[b_rows, :]^T over the dk columns -> (BLOCK_A, BLOCK_B) float32.

    With NUM_K == 1, ``a_hold`` is the a tile already loaded by the caller."""
    offs_k = tl.arange(0, BLOCK_K)
    if NUM_K == 1:
        bt = _load_tile(b_base, b_rows, offs_k, s_bn, s_bk, n_b, DK)
        s = _dot(a_hold, tl.trans(bt), tl.zeros([BLOCK_A, BLOCK_B], tl.float32), IEEE)
    else:
        s = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            at = _load_tile(a_base, a_rows, k0 + offs_k, s_an, s_ak, n_a, DK)
            bt = _load_tile(b_base, b_rows, k0 + offs_k, s_bn, s_bk, n_b, DK)
            s = _dot(at, tl.trans(bt), s, IEEE)
    return s


@triton.jit
def _scores_hold_b(a_base, s_an, s_ak, a_rows, n_a, b_base, s_bn, s_bk, b_rows, n_b, b_hold, DK,
                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                   NUM_K: tl.constexpr, IEEE: tl.constexpr):
    """As _scores, but with NUM_K == 1 it is the b tile (``b_hold``) that the caller holds."""
    offs_k = tl.arange(0, BLOCK_K)
    if NUM_K == 1:
        at = _load_tile(a_base, a_rows, offs_k, s_an, s_ak, n_a, DK)
        s = _dot(at, tl.trans(b_hold), tl.zeros([BLOCK_A, BLOCK_B], tl.float32), IEEE)
    else:
        s = _scores(a_base, s_an, s_ak, a_rows, n_a, b_base, s_bn, s_bk, b_rows, n_b, a_base,
                    DK, BLOCK_A, BLOCK_B, BLOCK_K, NUM_K, IEEE)
    return s


# ------------------------------------------------------------------------------------------
# Forward: y (B, N, dv) and lse (B, N) float32. Grid (B * cdiv(N, BLOCK_M), cdiv(dv, BLOCK_V)).
# ------------------------------------------------------------------------------------------
@triton.jit
def softmax_fwd_kernel(
        TH, PH, G, Y, LSE,
        s_tb, s_tn, s_tk, s_pb, s_pm, s_pk, s_gb, s_gm, s_gv, s_yb, s_yn, s_yv, s_lb, s_ln,
        N, M, DK, DV, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_K: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_M)
    b = (pid // n_tiles).to(tl.int64)
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_v = part * BLOCK_V + tl.arange(0, BLOCK_V)
    th = TH + b * s_tb
    ph = PH + b * s_pb
    gg = G + b * s_gb

    q = th  # placeholder when the theta tile is not held
    if NUM_K == 1:
        q = _load_tile(th, offs_m, tl.arange(0, BLOCK_K), s_tn, s_tk, N, DK)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _scores(th, s_tn, s_tk, offs_m, N, ph, s_pm, s_pk, offs_n, M, q, DK,
                    BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, IEEE)
        s = tl.where((offs_n < M)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(gg, offs_n, offs_v, s_gm, s_gv, M, DV)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new

    y = acc / l_i[:, None]
    _store_tile(Y + b * s_yb, y.to(Y.dtype.element_ty), offs_m, offs_v, s_yn, s_yv, N, DV)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2)
    if part == 0:  # lse once per row tile, by the program of the first dv part
        # (A mask "(offs_m < N) & (part == 0)" is int32 in Triton 3.9's interpreter, which
        # then refuses it: "mask has unsupported dtype".)
        tl.store(LSE + b * s_lb + offs_m.to(tl.int64) * s_ln, lse, mask=offs_m < N)


# ------------------------------------------------------------------------------------------
# Backward preprocess: Dd (B, N) float32 = rowsum(dy * y). Grid (B * cdiv(N, BLOCK_M),).
# ------------------------------------------------------------------------------------------
@triton.jit
def softmax_bwd_pre_kernel(
        DY, Y, Dd,
        s_db, s_dn, s_dv, s_yb, s_yn, s_yv,
        N, DV,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_M)
    b = (pid // n_tiles).to(tl.int64)
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        do = _load_tile(DY + b * s_db, offs_m, v0 + offs_v, s_dn, s_dv, N, DV)
        o = _load_tile(Y + b * s_yb, offs_m, v0 + offs_v, s_yn, s_yv, N, DV)
        acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Dd + b * N + offs_m.to(tl.int64), acc, mask=offs_m < N)


@triton.jit
def _dp_t(do, v_hold, gg, dy, offs_n, offs_m, offs_v, s_gm, s_gv, s_dn, s_dv, N, M, DV,
          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
          NUM_V: tl.constexpr, IEEE: tl.constexpr):
    """dP^T (BLOCK_N, BLOCK_M) = g[offs_n] dy[offs_m]^T over all of dv."""
    if NUM_V == 1:
        dpt = _dot(v_hold, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
    else:
        dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for v0 in range(0, DV, BLOCK_V):
            vt = _load_tile(gg, offs_n, v0 + offs_v, s_gm, s_gv, M, DV)
            dot_ = _load_tile(dy, offs_m, v0 + offs_v, s_dn, s_dv, N, DV)
            dpt = _dot(vt, tl.trans(dot_), dpt, IEEE)
    return dpt


@triton.jit
def _rmw_dot(ws, rows, n_rows, cols, n_cols, a, b, IEEE: tl.constexpr):
    """ws[rows, cols] += a @ b in a float32 workspace with row stride n_cols.

    Only this program touches these rows; the caller puts a barrier between iterations so the
    next read sees every thread's write (the load and store layouts may differ)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    ptrs = ws + rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    cur = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, _dot(a, b, cur, IEEE), mask=mask)


@triton.jit
def _copy_out(ws, out, rows, n_rows, n_cols, s_row, s_col, scale, BLOCK_C: tl.constexpr):
    """out[rows, :] = scale * ws[rows, :] (cast to out's dtype), chunk by chunk."""
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + offs_c
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        acc = tl.load(ws + rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :],
                      mask=mask, other=0.0)
        _store_tile(out, (acc * scale).to(out.dtype.element_ty), rows, cols, s_row, s_col,
                    n_rows, n_cols)


# ------------------------------------------------------------------------------------------
# Backward, key side: dphi (B, M, dk) and dg (B, M, dv), looping over query tiles.
#
# Head dims past one tile (NUM_K > 1 or NUM_V > 1) have two strategies:
#   SPLIT (recompute): grid (B * cdiv(M, BLOCK_N), max(NUM_K, NUM_V)); part p holds dg columns
#     [p*BLOCK_V, ...) when p < NUM_V and dphi columns [p*BLOCK_K, ...) when p < NUM_K in
#     registers; every part recomputes S (and dP when it writes dphi) for its key tile.
#   accumulate (SPLIT false): grid (B * cdiv(M, BLOCK_N), 1); S, P, dP, dS are computed once
#     per (key tile, query tile) and the dg / dphi chunks are accumulated in float32 workspaces
#     WV (B, M, dv) / WK (B, M, dk) that only this program touches (read-modify-write, no
#     atomics), then copied out. With NUM_K == NUM_V == 1 this is plain FlashAttention-2.
# ------------------------------------------------------------------------------------------
@triton.jit
def _dphi_update(dph_acc, pt, do, v_hold, gg, dy, th, di, offs_n, offs_m, offs_v, offs_ko,
                 s_gm, s_gv, s_dn, s_dv, s_tn, s_tk, N, M, DK, DV,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 NUM_V: tl.constexpr, IEEE: tl.constexpr):
    """dphi_acc += dS^T theta[:, this part's columns], dS^T = P^T * (dP^T - D)."""
    dpt = _dp_t(do, v_hold, gg, dy, offs_n, offs_m, offs_v, s_gm, s_gv, s_dn, s_dv, N, M, DV,
                BLOCK_N, BLOCK_M, BLOCK_V, NUM_V, IEEE)
    dst = pt * (dpt - di[None, :])
    q = _load_tile(th, offs_m, offs_ko, s_tn, s_tk, N, DK)
    return _dot(dst.to(q.dtype), q, dph_acc, IEEE)


@triton.jit
def softmax_bwd_kv_kernel(
        TH, PH, G, DY, LSE, Dd, DPH, DG, WK, WV,
        s_tb, s_tn, s_tk, s_pb, s_pm, s_pk, s_gb, s_gm, s_gv, s_db, s_dn, s_dv,
        s_lb, s_ln, s_qb, s_qm, s_qk, s_eb, s_em, s_ev,
        N, M, DK, DV, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_K: tl.constexpr, NUM_V: tl.constexpr,
        SPLIT: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n_tiles = tl.cdiv(M, BLOCK_N)
    b = (pid // n_tiles).to(tl.int64)
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    offs_ko = part * BLOCK_K + offs_k   # this part's dphi columns (SPLIT)
    offs_vo = part * BLOCK_V + offs_v   # this part's dg columns (SPLIT)
    th = TH + b * s_tb
    ph = PH + b * s_pb
    gg = G + b * s_gb
    dy = DY + b * s_db
    lse_b = LSE + b * s_lb
    dd_b = Dd + b * N
    wk = WK + b * M * DK
    wv = WV + b * M * DV

    k_hold = ph  # placeholders when a tile is not held
    v_hold = gg
    if NUM_K == 1:
        k_hold = _load_tile(ph, offs_n, offs_k, s_pm, s_pk, M, DK)
    if NUM_V == 1:
        v_hold = _load_tile(gg, offs_n, offs_v, s_gm, s_gv, M, DV)

    dg_acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    dph_acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N
        # S^T (BLOCK_N, BLOCK_M) and P^T = exp(S^T - lse); rows >= N get lse = +inf, so P = 0.
        # S^T is the transpose of theta phi^T, the operand order of the forward (and the q
        # kernel), not phi theta^T: P = exp(S - lse) is only as accurate as S matches the S
        # that lse came from (a dominant weight's rounding error in S cancels against lse's
        # only then), and a dot product's rounding need not be symmetric in its operands (the
        # interpreter's BLAS is not: phi theta^T cost up to 1.6x the tolerance on dg).
        st = tl.trans(_scores_hold_b(th, s_tn, s_tk, offs_m, N, ph, s_pm, s_pk, offs_n, M,
                                     k_hold, DK, BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, IEEE))
        lse2 = tl.load(lse_b + offs_m.to(tl.int64) * s_ln, mask=m_ok,
                       other=float("inf")) * 1.4426950408889634
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        di = tl.load(dd_b + offs_m.to(tl.int64), mask=m_ok, other=0.0)
        do = dy  # placeholder when dy is not held whole
        if NUM_V == 1:
            do = _load_tile(dy, offs_m, offs_v, s_dn, s_dv, N, DV)
        if SPLIT:
            if part < NUM_V:
                do_p = _load_tile(dy, offs_m, offs_vo, s_dn, s_dv, N, DV)
                dg_acc = _dot(pt.to(do_p.dtype), do_p, dg_acc, IEEE)
            if part < NUM_K:
                dph_acc = _dphi_update(dph_acc, pt, do, v_hold, gg, dy, th, di, offs_n, offs_m,
                                       offs_v, offs_ko, s_gm, s_gv, s_dn, s_dv, s_tn, s_tk,
                                       N, M, DK, DV, BLOCK_N, BLOCK_M, BLOCK_V, NUM_V, IEEE)
        else:
            dpt = _dp_t(do, v_hold, gg, dy, offs_n, offs_m, offs_v, s_gm, s_gv, s_dn, s_dv,
                        N, M, DV, BLOCK_N, BLOCK_M, BLOCK_V, NUM_V, IEEE)
            dst = pt * (dpt - di[None, :])
            if NUM_V == 1:
                dg_acc = _dot(pt.to(do.dtype), do, dg_acc, IEEE)
            else:
                for v0 in range(0, DV, BLOCK_V):
                    do_c = _load_tile(dy, offs_m, v0 + offs_v, s_dn, s_dv, N, DV)
                    _rmw_dot(wv, offs_n, M, v0 + offs_v, DV, pt.to(do_c.dtype), do_c, IEEE)
            if NUM_K == 1:
                q = _load_tile(th, offs_m, offs_k, s_tn, s_tk, N, DK)
                dph_acc = _dot(dst.to(q.dtype), q, dph_acc, IEEE)
            else:
                for k0 in range(0, DK, BLOCK_K):
                    q_c = _load_tile(th, offs_m, k0 + offs_k, s_tn, s_tk, N, DK)
                    _rmw_dot(wk, offs_n, M, k0 + offs_k, DK, dst.to(q_c.dtype), q_c, IEEE)
            if NUM_K * NUM_V > 1:
                tl.debug_barrier()  # this iteration's workspace writes before the next reads

    if SPLIT:
        # Parts past NUM_V (NUM_K) have offs_vo (offs_ko) >= DV (DK): stores masked off.
        _store_tile(DG + b * s_eb, dg_acc.to(DG.dtype.element_ty), offs_n, offs_vo,
                    s_em, s_ev, M, DV)
        _store_tile(DPH + b * s_qb, (dph_acc * scale).to(DPH.dtype.element_ty), offs_n,
                    offs_ko, s_qm, s_qk, M, DK)
    else:
        if NUM_V == 1:
            _store_tile(DG + b * s_eb, dg_acc.to(DG.dtype.element_ty), offs_n, offs_v,
                        s_em, s_ev, M, DV)
        else:
            _copy_out(wv, DG + b * s_eb, offs_n, M, DV, s_em, s_ev, 1.0, BLOCK_V)
        if NUM_K == 1:
            _store_tile(DPH + b * s_qb, (dph_acc * scale).to(DPH.dtype.element_ty), offs_n,
                        offs_k, s_qm, s_qk, M, DK)
        else:
            _copy_out(wk, DPH + b * s_qb, offs_n, M, DK, s_qm, s_qk, scale, BLOCK_K)


# ------------------------------------------------------------------------------------------
# Backward, query side: dtheta (B, N, dk), looping over key tiles (no atomics).
# SPLIT: grid (B * cdiv(N, BLOCK_M), NUM_K), part p holds dtheta columns [p*BLOCK_K, ...) and
# recomputes S and dP. Otherwise grid (B * cdiv(N, BLOCK_M), 1): with NUM_K > 1 the dtheta
# chunks accumulate in the float32 workspace WK (B, N, dk) of this program's rows.
# ------------------------------------------------------------------------------------------
@triton.jit
def softmax_bwd_q_kernel(
        TH, PH, G, DY, LSE, Dd, DTH, WK,
        s_tb, s_tn, s_tk, s_pb, s_pm, s_pk, s_gb, s_gm, s_gv, s_db, s_dn, s_dv,
        s_lb, s_ln, s_qb, s_qn, s_qk,
        N, M, DK, DV, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_K: tl.constexpr, NUM_V: tl.constexpr,
        SPLIT: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_M)
    b = (pid // n_tiles).to(tl.int64)
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    offs_ko = part * BLOCK_K + offs_k
    th = TH + b * s_tb
    ph = PH + b * s_pb
    gg = G + b * s_gb
    dy = DY + b * s_db
    wk = WK + b * N * DK

    q_hold = th  # placeholders when a tile is not held
    do_hold = dy
    if NUM_K == 1:
        q_hold = _load_tile(th, offs_m, offs_k, s_tn, s_tk, N, DK)
    if NUM_V == 1:
        do_hold = _load_tile(dy, offs_m, offs_v, s_dn, s_dv, N, DV)
    lse2 = tl.load(LSE + b * s_lb + offs_m.to(tl.int64) * s_ln, mask=m_ok,
                   other=float("inf")) * 1.4426950408889634
    di = tl.load(Dd + b * N + offs_m.to(tl.int64), mask=m_ok, other=0.0)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _scores(th, s_tn, s_tk, offs_m, N, ph, s_pm, s_pk, offs_n, M, q_hold, DK,
                    BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, IEEE)
        p = tl.where((offs_n < M)[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        if NUM_V == 1:
            vt = _load_tile(gg, offs_n, offs_v, s_gm, s_gv, M, DV)
            dp = _dot(do_hold, tl.trans(vt), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for v0 in range(0, DV, BLOCK_V):
                dot_ = _load_tile(dy, offs_m, v0 + offs_v, s_dn, s_dv, N, DV)
                vt = _load_tile(gg, offs_n, v0 + offs_v, s_gm, s_gv, M, DV)
                dp = _dot(dot_, tl.trans(vt), dp, IEEE)
        ds = p * (dp - di[:, None])
        if SPLIT or NUM_K == 1:
            kt = _load_tile(ph, offs_n, offs_ko, s_pm, s_pk, M, DK)
            dq_acc = _dot(ds.to(kt.dtype), kt, dq_acc, IEEE)
        else:
            for k0 in range(0, DK, BLOCK_K):
                kt = _load_tile(ph, offs_n, k0 + offs_k, s_pm, s_pk, M, DK)
                _rmw_dot(wk, offs_m, N, k0 + offs_k, DK, ds.to(kt.dtype), kt, IEEE)
            tl.debug_barrier()  # this iteration's workspace writes before the next reads

    if SPLIT or NUM_K == 1:
        _store_tile(DTH + b * s_qb, (dq_acc * scale).to(DTH.dtype.element_ty), offs_m,
                    offs_ko, s_qn, s_qk, N, DK)
    else:
        _copy_out(wk, DTH + b * s_qb, offs_m, N, DK, s_qn, s_qk, scale, BLOCK_K)
