"""Key-owned LLSA backward kernels: dk and dv from key-major lists, no atomics on floats.

A key block is the B children of one level-(l+1) token u. The queries that attend it are those under
the level-(l+1) ancestors listed for u in the transpose of level l+1's picks (for the fine level, the
query blocks that picked u). Pooled gradients land in float32 buffers and reach the original tokens
through the pooling backward, fused into the fine kernel's epilogue.
"""
import triton
import triton.language as tl

from llsa.ops.llsa.fwd import _log2_weight


@triton.jit
def _kv_queries(b_k, b_v, b_bias, b_dk, b_dv, Q, DO, LSE, DELTA, i_bh, N, q_start, q_end, o_d, qk_scale,
                D: tl.constexpr, BMQ: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dk, dv of one key block over the queries ``q_start .. q_end``."""
    for i_q in range(q_start, q_end, BMQ):
        o_q = i_q + tl.arange(0, BMQ).to(tl.int64)
        m_q = o_q < q_end
        p_qd = i_bh * N * D + o_q[:, None] * D + o_d[None, :]
        # [BMQ, D]
        b_q = tl.load(Q + p_qd, mask=m_q[:, None], other=0.)
        b_do = tl.load(DO + p_qd, mask=m_q[:, None], other=0.)
        # [BMQ]
        b_lse2 = tl.load(LSE + i_bh * N + o_q, mask=m_q, other=0.) * 1.4426950408889634
        b_delta = tl.load(DELTA + i_bh * N + o_q, mask=m_q, other=0.)
        # [BK, BMQ]
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale + b_bias[:, None]
        b_pt = tl.where(m_q[None, :], tl.math.exp2(b_st - b_lse2[None, :]), 0.)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def llsa_kv_kernel(Q, K, V, PK, PV, DO, LSE, DELTA, META, ROWPTR, IDX, DK, DV, DPK, DPV, N, n_pool, lv,
                   levels, qk_scale, B: tl.constexpr, D: tl.constexpr, BMQ: tl.constexpr, FINE: tl.constexpr,
                   POOLED: tl.constexpr, REWEIGHT: tl.constexpr, PREC: tl.constexpr):
    """dk, dv of the B children of level-(lv+1) token u over candidate segment lv.

    ``FINE`` (lv = 0): the children are original tokens; the epilogue adds every pooled level's gradient
    (divided by its token count) and writes the final dk, dv. Otherwise the result goes to the pooled
    gradient buffers DPK, DPV at level lv.
    """
    i_u, i_bh = tl.program_id(0), tl.program_id(1)
    i_u = i_u.to(tl.int64)
    i_bh = i_bh.to(tl.int64)
    n_l = tl.load(META + lv * 6 + 0)
    off_l = tl.load(META + lv * 6 + 3)
    span_l = tl.load(META + lv * 6 + 4)
    n_up = tl.load(META + (lv + 1) * 6 + 0)
    span_q = tl.load(META + (lv + 1) * 6 + 4)
    o_d = tl.arange(0, D)
    o_r = i_u * B + tl.arange(0, B)
    m_r = o_r < n_l
    if FINE:
        p_kd = i_bh * N * D + o_r[:, None] * D + o_d[None, :]
        p_k = K + p_kd
        p_v = V + p_kd
    else:
        p_kd = (i_bh * n_pool + off_l + o_r)[:, None] * D + o_d[None, :]
        p_k = PK + p_kd
        p_v = PV + p_kd
    # [B, D]
    b_k = tl.load(p_k, mask=m_r[:, None], other=0.)
    b_v = tl.load(p_v, mask=m_r[:, None], other=0.)
    b_bias = _log2_weight(o_r, m_r, span_l, N, REWEIGHT)
    b_dk = tl.zeros([B, D], dtype=tl.float32)
    b_dv = tl.zeros([B, D], dtype=tl.float32)
    p_ptr = ROWPTR + i_bh * (n_up + 1) + i_u
    start = tl.load(p_ptr)
    end = tl.load(p_ptr + 1)
    p_idx = IDX + i_bh * n_up * tl.load(META + (lv + 1) * 6 + 1)
    for i_e in range(start, end):
        i_a = tl.load(p_idx + i_e).to(tl.int64)
        q_start = i_a * span_q
        q_end = tl.minimum(q_start + span_q, N)
        b_dk, b_dv = _kv_queries(b_k, b_v, b_bias, b_dk, b_dv, Q, DO, LSE, DELTA, i_bh, N, q_start, q_end,
                                 o_d, qk_scale, D, BMQ, PREC)
    scale = qk_scale * 0.6931471805599453
    b_dk = b_dk * scale
    if FINE:
        if POOLED:
            for lp in range(1, levels + 1):
                off_p = tl.load(META + lp * 6 + 3)
                span_p = tl.load(META + lp * 6 + 4)
                o_a = o_r // span_p
                b_inv = 1.0 / (tl.minimum((o_a + 1) * span_p, N) - o_a * span_p).to(tl.float32)
                p_pd = (i_bh * n_pool + off_p + o_a)[:, None] * D + o_d[None, :]
                b_dk += tl.load(DPK + p_pd, mask=m_r[:, None], other=0.) * b_inv[:, None]
                b_dv += tl.load(DPV + p_pd, mask=m_r[:, None], other=0.) * b_inv[:, None]
        tl.store(DK + p_kd, b_dk.to(DK.dtype.element_ty), mask=m_r[:, None])
        tl.store(DV + p_kd, b_dv.to(DV.dtype.element_ty), mask=m_r[:, None])
    else:
        tl.store(DPK + p_kd, b_dk, mask=m_r[:, None])
        tl.store(DPV + p_kd, b_dv, mask=m_r[:, None])


@triton.jit
def llsa_top_kv_kernel(Q, PK, PV, DO, LSE, DELTA, META, PDK, PDV, N, n_pool, levels, chunk, qk_scale,
                       BK: tl.constexpr, D: tl.constexpr, BMQ: tl.constexpr, REWEIGHT: tl.constexpr,
                       PREC: tl.constexpr):
    """Partial dk, dv of BK coarsest tokens over one chunk of queries (every query sees every one)."""
    i_t, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    n_bh = tl.num_programs(2).to(tl.int64)
    n_t = tl.load(META + levels * 6 + 0)
    off_t = tl.load(META + levels * 6 + 3)
    span_t = tl.load(META + levels * 6 + 4)
    o_d = tl.arange(0, D)
    o_r = i_t.to(tl.int64) * BK + tl.arange(0, BK)
    m_r = o_r < n_t
    p_kd = (i_bh * n_pool + off_t + o_r)[:, None] * D + o_d[None, :]
    # [BK, D]
    b_k = tl.load(PK + p_kd, mask=m_r[:, None], other=0.)
    b_v = tl.load(PV + p_kd, mask=m_r[:, None], other=0.)
    b_bias = _log2_weight(o_r, m_r, span_t, N, REWEIGHT)
    b_dk = tl.zeros([BK, D], dtype=tl.float32)
    b_dv = tl.zeros([BK, D], dtype=tl.float32)
    q_start = i_c.to(tl.int64) * chunk
    q_end = tl.minimum(q_start + chunk, N)
    b_dk, b_dv = _kv_queries(b_k, b_v, b_bias, b_dk, b_dv, Q, DO, LSE, DELTA, i_bh, N, q_start, q_end, o_d,
                             qk_scale, D, BMQ, PREC)
    b_dk = b_dk * (qk_scale * 0.6931471805599453)
    p_out = ((i_c * n_bh + i_bh) * n_t + o_r)[:, None] * D + o_d[None, :]
    tl.store(PDK + p_out, b_dk, mask=m_r[:, None])
    tl.store(PDV + p_out, b_dv, mask=m_r[:, None])
