"""Query-owned LLSA kernel: the forward pass and, with ``BWD=True``, dq over the same key set.

One program owns one query block (the B queries under one level-1 token) and walks its whole key set:
segment 0 (the fine tokens of the blocks its level-1 token picked), the enriched candidate segments
(children of the picks of its level-(l+1) ancestor), and, when ``TOP``, every coarsest token. Weights
enter as a log2 bias, so reweighting costs one add per score. ``META`` rows are ``Layout.meta``'s
(6 int64 per level).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _cand_rows(p_row, k_up, i_it, n_l, o_n, B: tl.constexpr, KPI: tl.constexpr):
    """Rows of tile ``i_it`` of a candidate segment: children of picks ``i_it*KPI ..`` of one ancestor."""
    o_slot = i_it * KPI + o_n // B
    m_slot = o_slot < k_up
    b_u = tl.load(p_row + o_slot, mask=m_slot, other=0).to(tl.int64)
    o_row = b_u * B + o_n % B
    return o_row, m_slot & (o_row < n_l)


@triton.jit
def _log2_weight(o_row, m_row, span, n, REWEIGHT: tl.constexpr):
    """log2 of each key's weight (its token count when reweighting), -inf for keys that don't exist."""
    if REWEIGHT:
        b_cnt = (tl.minimum((o_row + 1) * span, n) - o_row * span).to(tl.float32)
        b_w = tl.log2(tl.maximum(b_cnt, 1.0))
    else:
        b_w = tl.zeros(o_row.shape, dtype=tl.float32)
    return tl.where(m_row, b_w, float("-inf"))


@triton.jit
def _bq(x, SWAP: tl.constexpr):
    """A per-query vector broadcast against a query tile: [BM] -> [BM, 1], or [1, BM] when swapped."""
    if SWAP:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc, b_m, b_l, qk_scale,
            D: tl.constexpr, BWD: tl.constexpr, SWAP: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax (or of dq). With ``SWAP`` the query tiles are transposed,
    [D, BM], so every product has the BN keys or the D channels as its row dimension: Hopper's wgmma
    needs 64 rows, which a 16-query block alone cannot give."""
    # [BN, D]
    b_k = tl.load(p_k + o_row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    b_v = tl.load(p_v + o_row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    if SWAP:
        # [BN, BM]
        b_s = tl.dot(b_k, b_q, input_precision=PREC) * qk_scale + b_bias[:, None]
        if BWD:
            b_p = tl.math.exp2(b_s - b_lse2[None, :])
            b_dp = tl.dot(b_v, b_do, input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[None, :])
            # [D, BM]
            b_acc += tl.dot(tl.trans(b_k), b_ds.to(b_k.dtype), input_precision=PREC)
        else:
            b_mn = tl.maximum(b_m, tl.max(b_s, 0))
            b_p = tl.math.exp2(b_s - b_mn[None, :])
            b_alpha = tl.math.exp2(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p, 0)
            b_acc = b_acc * b_alpha[None, :] + tl.dot(tl.trans(b_v), b_p.to(b_v.dtype), input_precision=PREC)
            b_m = b_mn
    else:
        # [BM, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale + b_bias[None, :]
        if BWD:
            b_p = tl.math.exp2(b_s - b_lse2[:, None])
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            # [BM, D]
            b_acc += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
        else:
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_p = tl.math.exp2(b_s - b_mn[:, None])
            b_alpha = tl.math.exp2(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
            b_m = b_mn
    return b_acc, b_m, b_l


@triton.jit
def llsa_q_kernel(Q, K, V, PK, PV, SEL, META, DO, LSE, DELTA, OUT, PART, PLSE, N, n_pool, n_sel, n_seg, levels,
                  qk_scale, B: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, KPI: tl.constexpr,
                  FINE: tl.constexpr, SHARED: tl.constexpr, MERGE: tl.constexpr, TOP: tl.constexpr,
                  REWEIGHT: tl.constexpr, BWD: tl.constexpr, SWAP: tl.constexpr, PREC: tl.constexpr):
    """Forward (OUT = o, LSE written) or dq (OUT = dq; LSE and DELTA read) for BM queries.

    ``FINE``: segment 0, whose keys differ per query block, so BM = B. ``SHARED``: the enriched candidate
    segments and the coarsest level, whose keys all BM queries share (BM <= B^2 keeps a tile under one
    level-2 ancestor). Split runs write the shared part to PART (o and its LSE in PLSE, or dq) and the
    fine run merges it (``MERGE``) through the log-sum-exp.
    """
    BN: tl.constexpr = KPI * B
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    o_m = i_t.to(tl.int64) * BM + tl.arange(0, BM)
    m_m = o_m < N
    # the query block of the tile's first row; every row shares its ancestors above level 1
    i_qb = i_t.to(tl.int64) * (BM // B)
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BN)
    if SWAP:
        # [D, BM]
        p_qd = i_bh * N * D + o_m[None, :] * D + o_d[:, None]
        b_acc = tl.zeros([D, BM], dtype=tl.float32)
    else:
        # [BM, D]
        p_qd = i_bh * N * D + o_m[:, None] * D + o_d[None, :]
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
    m_qd = _bq(m_m, SWAP)
    b_q = tl.load(Q + p_qd, mask=m_qd, other=0.)
    if BWD:
        b_do = tl.load(DO + p_qd, mask=m_qd, other=0.)
        # [BM]
        b_lse2 = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.) * 1.4426950408889634
        b_delta = tl.load(DELTA + i_bh * N + o_m, mask=m_m, other=0.)
    else:
        b_do = b_q
        b_lse2 = tl.zeros([BM], dtype=tl.float32)
        b_delta = b_lse2
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    p_sel = SEL + i_bh * n_sel

    if FINE:
        seg_lo = 0
    else:
        seg_lo = 1
    if SHARED:
        seg_hi = n_seg
    else:
        seg_hi = 1
    for lv in range(seg_lo, seg_hi):
        n_l = tl.load(META + lv * 6 + 0)
        off_l = tl.load(META + lv * 6 + 3)
        span_l = tl.load(META + lv * 6 + 4)
        k_up = tl.load(META + (lv + 1) * 6 + 1)
        sel_up = tl.load(META + (lv + 1) * 6 + 2)
        if lv == 0:
            p_k = K + i_bh * N * D
            p_v = V + i_bh * N * D
        else:
            p_k = PK + (i_bh * n_pool + off_l) * D
            p_v = PV + (i_bh * n_pool + off_l) * D
        # the level-(lv+1) ancestor of these queries owns the candidate list
        p_row = p_sel + sel_up + (i_qb // span_l) * k_up
        for i_it in range(0, tl.cdiv(k_up, KPI)):
            o_row, m_row = _cand_rows(p_row, k_up, i_it, n_l, o_n, B, KPI)
            b_bias = _log2_weight(o_row, m_row, span_l, N, REWEIGHT)
            b_acc, b_m, b_l = _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc,
                                      b_m, b_l, qk_scale, D, BWD, SWAP, PREC)
    if SHARED and TOP:
        n_t = tl.load(META + levels * 6 + 0)
        off_t = tl.load(META + levels * 6 + 3)
        span_t = tl.load(META + levels * 6 + 4)
        p_k = PK + (i_bh * n_pool + off_t) * D
        p_v = PV + (i_bh * n_pool + off_t) * D
        for i_it in range(0, tl.cdiv(n_t, BN)):
            o_row = i_it * BN + o_n.to(tl.int64)
            m_row = o_row < n_t
            b_bias = _log2_weight(o_row, m_row, span_t, N, REWEIGHT)
            b_acc, b_m, b_l = _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc,
                                      b_m, b_l, qk_scale, D, BWD, SWAP, PREC)
    if BWD:
        b_out = b_acc * (qk_scale * 0.6931471805599453)
        if MERGE:
            b_out += tl.load(PART + p_qd, mask=m_qd, other=0.)
    else:
        if MERGE:
            # [BM, D], [BM]: the shared part, normalised, and its log2-sum-exp
            b_po = tl.load(PART + p_qd, mask=m_qd, other=0.)
            b_plse2 = tl.load(PLSE + i_bh * N + o_m, mask=m_m, other=0.) * 1.4426950408889634
            b_mn = tl.maximum(b_m, b_plse2)
            b_alpha = tl.math.exp2(b_m - b_mn)
            b_beta = tl.math.exp2(b_plse2 - b_mn)
            b_acc = b_acc * _bq(b_alpha, SWAP) + b_po * _bq(b_beta, SWAP)
            b_l = b_l * b_alpha + b_beta
            b_m = b_mn
        b_out = b_acc / _bq(b_l, SWAP)
        tl.store(LSE + i_bh * N + o_m, (b_m + tl.log2(b_l)) * 0.6931471805599453, mask=m_m)
    tl.store(OUT + p_qd, b_out.to(OUT.dtype.element_ty), mask=m_qd)
