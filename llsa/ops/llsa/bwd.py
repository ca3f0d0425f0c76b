"""LLSA dk/dv kernels, no atomics on floats.

Fine keys are key-owned: one program per level-1 token u walks the key-major list of the query blocks
that picked it. Enriched candidates are ancestor-owned: all queries under a level-(l+1) ancestor attend
the same K*B level-l keys, so one program per (ancestor, key tile) reads those queries once and writes a
partial; a reduction then sums each key's partials over the ancestors that picked it. The coarsest level,
seen by every query, sums partials over query chunks. Pooled gradients land in float32 buffers and reach
the original tokens through the pooling backward, fused into the fine kernel's epilogue.
"""
import triton
import triton.language as tl

from llsa.ops.common import K_LN2, K_LOG2E
from llsa.ops.llsa.layout import POOL_OFF, SEL_OFF, SIZE, SPAN, WIDTH, level_field

from llsa.ops.llsa.fwd import _cand_rows, _level_log2_weights, _log2_weight


@triton.jit
def _kv_queries(b_k, b_v, b_bias, b_dkt, b_dvt, Q, DO, LSE, DELTA, p_idx, first, count, span_q, width, i_bh, N,
                o_d, qk_scale, D: tl.constexpr, BMQ: tl.constexpr, GATHER: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dk^T, dv^T ([D, BK]) of one key tile over ``count * span_q`` query rows.

    With ``GATHER`` the rows are the ``span_q`` queries under each of ``count`` listed ancestors
    ``p_idx[first : first + count] // width`` (the lists hold flat pick positions), packed BMQ rows per
    step (several 16-query blocks at the fine level), so each product has at least 64 rows; otherwise
    they are the contiguous rows ``first .. first + count``.
    Accumulating transposed keeps the channel dim D as the row dim of the dk/dv products.
    """
    total = count * span_q
    for i_v in range(0, total, BMQ):
        o_v = i_v + tl.arange(0, BMQ).to(tl.int64)
        m_v = o_v < total
        if GATHER:
            b_a = tl.load(p_idx + first + o_v // span_q, mask=m_v, other=0).to(tl.int64) // width
            o_q = b_a * span_q + o_v % span_q
        else:
            o_q = first + o_v
        m_q = m_v & (o_q < N)
        p_qd = i_bh * N * D + o_q[:, None] * D + o_d[None, :]
        # [BMQ, D]
        b_q = tl.load(Q + p_qd, mask=m_q[:, None], other=0.)
        b_do = tl.load(DO + p_qd, mask=m_q[:, None], other=0.)
        # [BMQ]
        b_lse2 = tl.load(LSE + i_bh * N + o_q, mask=m_q, other=0.) * K_LOG2E
        b_delta = tl.load(DELTA + i_bh * N + o_q, mask=m_q, other=0.)
        # [BMQ, BK]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale + b_bias[None, :]
        b_p = tl.where(m_q[:, None], tl.math.exp2(b_s - b_lse2[:, None]), 0.)
        # [D, BK]
        b_dvt += tl.dot(tl.trans(b_do), b_p.to(b_do.dtype), input_precision=PREC)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dkt += tl.dot(tl.trans(b_q), b_ds.to(b_q.dtype), input_precision=PREC)
    return b_dkt, b_dvt


@triton.jit
def _key_tile(K, V, o_kr, o_row, m_row, o_d, span, n_l, N, D: tl.constexpr, BN: tl.constexpr,
              REWEIGHT: tl.constexpr):
    """The BN key and value rows at flat rows ``o_kr`` (valid where ``m_row``; ``o_row`` is their index in
    their level of ``n_l`` tokens, which cover ``span`` originals each), their log2 weights, and zeroed dk^T,
    dv^T."""
    # [BN, D]
    b_k = tl.load(K + o_kr[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    b_v = tl.load(V + o_kr[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    w_full, w_last = _level_log2_weights(span, n_l, N)
    b_bias = _log2_weight(o_row, m_row, n_l, w_full, w_last, REWEIGHT, False)
    # [D, BN]
    b_zero = tl.zeros([D, BN], dtype=tl.float32)
    return b_k, b_v, b_bias, b_zero, b_zero


@triton.jit
def llsa_kv_kernel(Q, K, V, DO, LSE, DELTA, META, ROWPTR, IDX, DK, DV, DPK, DPV, N, n_pool, levels, qk_scale,
                   B: tl.constexpr, D: tl.constexpr, BMQ: tl.constexpr, POOLED: tl.constexpr,
                   REWEIGHT: tl.constexpr, PREC: tl.constexpr):
    """dk, dv of the B original tokens under level-1 token u: the fine segment, over the query blocks that
    picked u, plus (``POOLED``) every pooled level's gradient divided by its token count."""
    i_u, i_bh = tl.program_id(0), tl.program_id(1)
    i_u = i_u.to(tl.int64)
    i_bh = i_bh.to(tl.int64)
    n_up = level_field(META, 1, SIZE)
    w_up = level_field(META, 1, WIDTH)
    o_d = tl.arange(0, D)
    o_r = i_u * B + tl.arange(0, B)
    m_r = o_r < N
    o_kr = i_bh * N + o_r
    b_k, b_v, b_bias, b_dkt, b_dvt = _key_tile(K, V, o_kr, o_r, m_r, o_d, 1, N, N, D, B, REWEIGHT)
    p_ptr = ROWPTR + i_bh * (n_up + 1) + i_u
    first = tl.load(p_ptr)
    count = tl.load(p_ptr + 1) - first
    b_dkt, b_dvt = _kv_queries(b_k, b_v, b_bias, b_dkt, b_dvt, Q, DO, LSE, DELTA, IDX + i_bh * n_up * w_up,
                               first, count, B, w_up, i_bh, N, o_d, qk_scale, D, BMQ, True, PREC)
    b_dkt = b_dkt * (qk_scale * K_LN2)
    # [D, B] transposed addresses of the B key rows
    p_t = o_kr[None, :] * D + o_d[:, None]
    m_t = m_r[None, :]
    if POOLED:
        for lp in range(1, levels + 1):
            off_p = level_field(META, lp, POOL_OFF)
            span_p = level_field(META, lp, SPAN)
            # the tile's B tokens all lie under one level-lp token (spans are multiples of B)
            i_a = i_u * B // span_p
            inv = 1.0 / (tl.minimum((i_a + 1) * span_p, N) - i_a * span_p).to(tl.float32)
            p_pa = (i_bh * n_pool + off_p + i_a) * D + o_d
            # [D, 1]
            b_dkt += (tl.load(DPK + p_pa) * inv)[:, None]
            b_dvt += (tl.load(DPV + p_pa) * inv)[:, None]
    tl.store(DK + p_t, b_dkt.to(DK.dtype.element_ty), mask=m_t)
    tl.store(DV + p_t, b_dvt.to(DV.dtype.element_ty), mask=m_t)


@triton.jit
def llsa_cand_kv_kernel(Q, PK, PV, DO, LSE, DELTA, META, SEL, PART_K, PART_V, N, n_pool, n_sel, n_part, lv,
                        n_tiles, qk_scale, B: tl.constexpr, D: tl.constexpr, KPI: tl.constexpr,
                        BMQ: tl.constexpr, REWEIGHT: tl.constexpr, PREC: tl.constexpr):
    """Partial dk, dv of one tile of KPI candidate blocks of ancestor a (a level-(lv+1) token, lv >= 1)
    over a's queries, which all attend exactly these keys.

    Every query under a is read once per tile, against KPI*B keys, instead of once per key block that
    it attends. The partial of slot s, child c lands at row ``(a*w_up + s)*B + c`` of PART_K/PART_V (the
    flat pick position times B), where ``llsa_cand_reduce_kernel`` sums each key's partials.
    """
    BN: tl.constexpr = KPI * B
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    i_a = (i_p // n_tiles).to(tl.int64)
    i_it = i_p % n_tiles
    n_l = level_field(META, lv, SIZE)
    off_l = level_field(META, lv, POOL_OFF)
    span_l = level_field(META, lv, SPAN)
    w_up = level_field(META, lv + 1, WIDTH)
    sel_up = level_field(META, lv + 1, SEL_OFF)
    span_q = level_field(META, lv + 1, SPAN)
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BN)
    o_row, m_row = _cand_rows(SEL + i_bh * n_sel + sel_up + i_a * w_up, None, w_up, i_it, n_l, o_n, B, KPI, 0, False)
    o_kr = i_bh * n_pool + off_l + o_row
    b_k, b_v, b_bias, b_dkt, b_dvt = _key_tile(PK, PV, o_kr, o_row, m_row, o_d, span_l, n_l, N, D, BN, REWEIGHT)
    first = i_a * span_q
    count = tl.minimum(span_q, N - first)
    b_dkt, b_dvt = _kv_queries(b_k, b_v, b_bias, b_dkt, b_dvt, Q, DO, LSE, DELTA, SEL, first, count, 1, 1, i_bh,
                               N, o_d, qk_scale, D, BMQ, False, PREC)
    b_dkt = b_dkt * (qk_scale * K_LN2)
    o_slot = i_it * KPI + o_n // B
    o_p = (i_a * w_up + o_slot) * B + o_n % B
    p_t = (i_bh * n_part + o_p)[None, :] * D + o_d[:, None]
    m_t = (o_slot < w_up)[None, :]
    tl.store(PART_K + p_t, b_dkt, mask=m_t)
    tl.store(PART_V + p_t, b_dvt, mask=m_t)


@triton.jit
def llsa_cand_reduce_kernel(PART_K, PART_V, META, ROWPTR, IDX, DPK, DPV, n_pool, n_part, lv, B: tl.constexpr,
                            D: tl.constexpr):
    """dk, dv of the B level-lv children of level-(lv+1) token u: the sum of their partials over the
    ancestors that picked u (its key-major list, whose entries are flat pick positions)."""
    i_u, i_bh = tl.program_id(0), tl.program_id(1)
    i_u = i_u.to(tl.int64)
    i_bh = i_bh.to(tl.int64)
    n_l = level_field(META, lv, SIZE)
    off_l = level_field(META, lv, POOL_OFF)
    n_up = level_field(META, lv + 1, SIZE)
    w_up = level_field(META, lv + 1, WIDTH)
    o_c = tl.arange(0, B)
    o_d = tl.arange(0, D)
    p_ptr = ROWPTR + i_bh * (n_up + 1) + i_u
    first = tl.load(p_ptr)
    last = tl.load(p_ptr + 1)
    # [B, D]
    b_dk = tl.zeros([B, D], dtype=tl.float32)
    b_dv = tl.zeros([B, D], dtype=tl.float32)
    for i_e in range(first, last):
        i_pos = tl.load(IDX + i_bh * n_up * w_up + i_e).to(tl.int64)
        p_p = (i_bh * n_part + i_pos * B + o_c)[:, None] * D + o_d[None, :]
        b_dk += tl.load(PART_K + p_p)
        b_dv += tl.load(PART_V + p_p)
    o_r = i_u * B + o_c
    p_o = (i_bh * n_pool + off_l + o_r)[:, None] * D + o_d[None, :]
    tl.store(DPK + p_o, b_dk, mask=(o_r < n_l)[:, None])
    tl.store(DPV + p_o, b_dv, mask=(o_r < n_l)[:, None])


@triton.jit
def llsa_top_kv_kernel(Q, PK, PV, DO, LSE, DELTA, META, PDK, PDV, N, n_pool, levels, chunk, qk_scale,
                       BK: tl.constexpr, D: tl.constexpr, BMQ: tl.constexpr, REWEIGHT: tl.constexpr,
                       PREC: tl.constexpr):
    """Partial dk, dv of BK coarsest tokens over one chunk of queries (every query sees every one)."""
    i_t, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    n_bh = tl.num_programs(2).to(tl.int64)
    n_t = level_field(META, levels, SIZE)
    off_t = level_field(META, levels, POOL_OFF)
    span_t = level_field(META, levels, SPAN)
    o_d = tl.arange(0, D)
    o_r = i_t.to(tl.int64) * BK + tl.arange(0, BK)
    m_r = o_r < n_t
    o_kr = i_bh * n_pool + off_t + o_r
    b_k, b_v, b_bias, b_dkt, b_dvt = _key_tile(PK, PV, o_kr, o_r, m_r, o_d, span_t, n_t, N, D, BK, REWEIGHT)
    first = i_c.to(tl.int64) * chunk
    count = tl.minimum(first + chunk, N) - first
    b_dkt, b_dvt = _kv_queries(b_k, b_v, b_bias, b_dkt, b_dvt, Q, DO, LSE, DELTA, LSE, first, count, 1, 1, i_bh,
                               N, o_d, qk_scale, D, BMQ, False, PREC)
    b_dkt = b_dkt * (qk_scale * K_LN2)
    p_t = ((i_c * n_bh + i_bh) * n_t + o_r)[None, :] * D + o_d[:, None]
    tl.store(PDK + p_t, b_dkt, mask=m_r[None, :])
    tl.store(PDV + p_t, b_dvt, mask=m_r[None, :])


@triton.jit
def delta_kernel(O, DO, DELTA, n_rows, D: tl.constexpr, BR: tl.constexpr):
    """delta_i = rowsum(o_i * do_i) in float32: one read of o and do."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < n_rows
    p = o_r[:, None] * D + tl.arange(0, D)[None, :]
    # [BR, D]
    b_o = tl.load(O + p, mask=m_r[:, None], other=0.).to(tl.float32)
    b_do = tl.load(DO + p, mask=m_r[:, None], other=0.).to(tl.float32)
    tl.store(DELTA + o_r, tl.sum(b_o * b_do, axis=1), mask=m_r)
