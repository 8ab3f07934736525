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
def _rows_dot(a_base, s_an, s_ak, a_rows, n_a, a_hold, b_base, s_bn, s_bk, b_rows, n_b, b_hold,
              K, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              NUM_K: tl.constexpr, HOLD_A: tl.constexpr, HOLD_B: tl.constexpr,
              IEEE: tl.constexpr):
    """a[a_rows, :] . b[b_rows, :]^T over the K columns -> (BLOCK_A, BLOCK_B) float32, in
    NUM_K = cdiv(K, BLOCK_K) chunks (S over dk, dP over dv).

    With NUM_K == 1, ``a_hold`` (HOLD_A) and ``b_hold`` (HOLD_B) are tiles the caller has
    already loaded; a tile not held is loaded here (and the ``*_hold`` argument is unused)."""
    offs_k = tl.arange(0, BLOCK_K)
    if NUM_K == 1:
        at = a_hold
        bt = b_hold
        if not HOLD_A:
            at = _load_tile(a_base, a_rows, offs_k, s_an, s_ak, n_a, K)
        if not HOLD_B:
            bt = _load_tile(b_base, b_rows, offs_k, s_bn, s_bk, n_b, K)
        s = _dot(at, tl.trans(bt), tl.zeros([BLOCK_A, BLOCK_B], tl.float32), IEEE)
    else:
        s = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            at = _load_tile(a_base, a_rows, k0 + offs_k, s_an, s_ak, n_a, K)
            bt = _load_tile(b_base, b_rows, k0 + offs_k, s_bn, s_bk, n_b, K)
            s = _dot(at, tl.trans(bt), s, IEEE)
    return s


@triton.jit
def _tile(n, BLOCK: tl.constexpr):
    """(batch element, rows) of this program's tile: program_id(0) walks the cdiv(n, BLOCK)
    tiles of batch element 0, then those of batch element 1, ..."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n, BLOCK)
    b = (pid // n_tiles).to(tl.int64)
    return b, (pid % n_tiles) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _lse2_and_d(lse_b, s_ln, dd_b, rows, ok):
    """lse * log2(e) and D of one batch element's rows; rows where ``ok`` is false (past N)
    get lse = +inf (so P = exp2(S * qk_scale - lse2) = 0) and D = 0."""
    lse2 = tl.load(lse_b + rows.to(tl.int64) * s_ln, mask=ok,
                   other=float("inf")) * 1.4426950408889634
    return lse2, tl.load(dd_b + rows.to(tl.int64), mask=ok, other=0.0)


@triton.jit
def _hold(base, rows, n_rows, s_row, s_col, n_cols, BLOCK_C: tl.constexpr, NUM_C: tl.constexpr):
    """base[rows, :n_cols] when it fits one chunk of columns (NUM_C == 1): a tile a program
    loads once and holds across its loop; else ``base`` as a placeholder (loaded by chunks)."""
    t = base
    if NUM_C == 1:
        t = _load_tile(base, rows, tl.arange(0, BLOCK_C), s_row, s_col, n_rows, n_cols)
    return t


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
    b, offs_m = _tile(N, BLOCK_M)
    part = tl.program_id(1)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_v = part * BLOCK_V + tl.arange(0, BLOCK_V)
    th = TH + b * s_tb
    ph = PH + b * s_pb
    gg = G + b * s_gb

    q = _hold(th, offs_m, N, s_tn, s_tk, DK, BLOCK_K, NUM_K)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _rows_dot(th, s_tn, s_tk, offs_m, N, q, ph, s_pm, s_pk, offs_n, M, ph, DK,
                      BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, True, False, IEEE)
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
    b, offs_m = _tile(N, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        do = _load_tile(DY + b * s_db, offs_m, v0 + offs_v, s_dn, s_dv, N, DV)
        o = _load_tile(Y + b * s_yb, offs_m, v0 + offs_v, s_yn, s_yv, N, DV)
        acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Dd + b * N + offs_m.to(tl.int64), acc, mask=offs_m < N)


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
def _acc_dot(acc, a, b_base, b_rows, n_b, s_bn, s_bc, cols, C, ws, ws_rows, n_ws,
             BLOCK_C: tl.constexpr, IN_REGS: tl.constexpr, IEEE: tl.constexpr):
    """a @ b[b_rows, :] (b: C columns; a rounded to b's dtype): with IN_REGS, acc holds its
    columns ``cols`` and acc + a @ b[b_rows, cols] is returned; otherwise it is added to the
    float32 workspace ws[ws_rows, :] (row stride C) in chunks of BLOCK_C columns, and acc is
    returned unchanged."""
    if IN_REGS:
        bt = _load_tile(b_base, b_rows, cols, s_bn, s_bc, n_b, C)
        acc = _dot(a.to(bt.dtype), bt, acc, IEEE)
    else:
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            bt = _load_tile(b_base, b_rows, c0 + offs_c, s_bn, s_bc, n_b, C)
            _rmw_dot(ws, ws_rows, n_ws, c0 + offs_c, C, a.to(bt.dtype), bt, IEEE)
    return acc


@triton.jit
def _write_out(acc, ws, out, rows, n_rows, cols, n_cols, s_row, s_col, scale,
               BLOCK_C: tl.constexpr, IN_REGS: tl.constexpr):
    """out[rows, :] = scale * a product accumulated as _acc_dot does: acc (out's columns cols)
    with IN_REGS, else the workspace ws."""
    if IN_REGS:
        _store_tile(out, (acc * scale).to(out.dtype.element_ty), rows, cols, s_row, s_col,
                    n_rows, n_cols)
    else:
        _copy_out(ws, out, rows, n_rows, n_cols, s_row, s_col, scale, BLOCK_C)


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
def _dphi_update(dph_acc, pt, do, v_hold, gg, dy, th, di, wk, offs_n, offs_m, offs_v, cols,
                 s_gm, s_gv, s_dn, s_dv, s_tn, s_tk, N, M, DK, DV,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_V: tl.constexpr, NUM_V: tl.constexpr, IN_REGS: tl.constexpr,
                 IEEE: tl.constexpr):
    """dS^T theta, dS^T = P^T * (dP^T - D) and dP^T = g dy^T: added to dph_acc (dphi's columns
    cols) with IN_REGS, else to the workspace wk (see _acc_dot)."""
    dpt = _rows_dot(gg, s_gm, s_gv, offs_n, M, v_hold, dy, s_dn, s_dv, offs_m, N, do, DV,
                    BLOCK_N, BLOCK_M, BLOCK_V, NUM_V, True, True, IEEE)
    dst = pt * (dpt - di[None, :])
    return _acc_dot(dph_acc, dst, th, offs_m, N, s_tn, s_tk, cols, DK, wk, offs_n, M, BLOCK_K,
                    IN_REGS, IEEE)


@triton.jit
def softmax_bwd_kv_kernel(
        TH, PH, G, DY, LSE, Dd, DPH, DG, WK, WV,
        s_tb, s_tn, s_tk, s_pb, s_pm, s_pk, s_gb, s_gm, s_gv, s_db, s_dn, s_dv,
        s_lb, s_ln, s_qb, s_qm, s_qk, s_eb, s_em, s_ev,
        N, M, DK, DV, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_K: tl.constexpr, NUM_V: tl.constexpr,
        SPLIT: tl.constexpr, IEEE: tl.constexpr):
    b, offs_n = _tile(M, BLOCK_N)
    part = tl.program_id(1)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    offs_ko = offs_k  # the dphi and dg columns held in registers (SPLIT: this part's)
    offs_vo = offs_v
    if SPLIT:
        offs_ko = part * BLOCK_K + offs_k
        offs_vo = part * BLOCK_V + offs_v
    th = TH + b * s_tb
    ph = PH + b * s_pb
    gg = G + b * s_gb
    dy = DY + b * s_db
    lse_b = LSE + b * s_lb
    dd_b = Dd + b * N
    wk = WK + b * M * DK
    wv = WV + b * M * DV

    k_hold = _hold(ph, offs_n, M, s_pm, s_pk, DK, BLOCK_K, NUM_K)
    v_hold = _hold(gg, offs_n, M, s_gm, s_gv, DV, BLOCK_V, NUM_V)

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
        st = tl.trans(_rows_dot(th, s_tn, s_tk, offs_m, N, th, ph, s_pm, s_pk, offs_n, M, k_hold,
                                DK, BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, False, True, IEEE))
        lse2, di = _lse2_and_d(lse_b, s_ln, dd_b, offs_m, m_ok)
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        do = _hold(dy, offs_m, N, s_dn, s_dv, DV, BLOCK_V, NUM_V)
        if SPLIT:
            if part < NUM_V:
                dg_acc = _acc_dot(dg_acc, pt, dy, offs_m, N, s_dn, s_dv, offs_vo, DV, wv, offs_n,
                                  M, BLOCK_V, True, IEEE)
        elif NUM_V == 1:
            dg_acc = _dot(pt.to(do.dtype), do, dg_acc, IEEE)  # dy's tile is held
        else:
            _acc_dot(dg_acc, pt, dy, offs_m, N, s_dn, s_dv, offs_v, DV, wv, offs_n, M, BLOCK_V,
                     False, IEEE)  # into the workspace wv
        if not SPLIT or part < NUM_K:
            dph_acc = _dphi_update(dph_acc, pt, do, v_hold, gg, dy, th, di, wk, offs_n, offs_m,
                                   offs_v, offs_ko, s_gm, s_gv, s_dn, s_dv, s_tn, s_tk, N, M, DK,
                                   DV, BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_V, NUM_V,
                                   SPLIT or NUM_K == 1, IEEE)
        if not SPLIT and NUM_K * NUM_V > 1:
            tl.debug_barrier()  # this iteration's workspace writes before the next reads

    # SPLIT: parts past NUM_V (NUM_K) have offs_vo (offs_ko) >= DV (DK): stores masked off.
    _write_out(dg_acc, wv, DG + b * s_eb, offs_n, M, offs_vo, DV, s_em, s_ev, 1.0, BLOCK_V,
               SPLIT or NUM_V == 1)
    _write_out(dph_acc, wk, DPH + b * s_qb, offs_n, M, offs_ko, DK, s_qm, s_qk, scale, BLOCK_K,
               SPLIT or NUM_K == 1)


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
    b, offs_m = _tile(N, BLOCK_M)
    part = tl.program_id(1)
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

    q_hold = _hold(th, offs_m, N, s_tn, s_tk, DK, BLOCK_K, NUM_K)
    do_hold = _hold(dy, offs_m, N, s_dn, s_dv, DV, BLOCK_V, NUM_V)
    lse2, di = _lse2_and_d(LSE + b * s_lb, s_ln, Dd + b * N, offs_m, m_ok)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _rows_dot(th, s_tn, s_tk, offs_m, N, q_hold, ph, s_pm, s_pk, offs_n, M, ph, DK,
                      BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, True, False, IEEE)
        p = tl.where((offs_n < M)[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = _rows_dot(dy, s_dn, s_dv, offs_m, N, do_hold, gg, s_gm, s_gv, offs_n, M, gg, DV,
                       BLOCK_M, BLOCK_N, BLOCK_V, NUM_V, True, False, IEEE)
        ds = p * (dp - di[:, None])
        dq_acc = _acc_dot(dq_acc, ds, ph, offs_n, M, s_pm, s_pk, offs_ko, DK, wk, offs_m, N,
                          BLOCK_K, SPLIT or NUM_K == 1, IEEE)
        if not (SPLIT or NUM_K == 1):
            tl.debug_barrier()  # this iteration's workspace writes before the next reads

    _write_out(dq_acc, wk, DTH + b * s_qb, offs_m, N, offs_ko, DK, s_qn, s_qk, scale, BLOCK_K,
               SPLIT or NUM_K == 1)
