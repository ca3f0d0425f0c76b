"""Query-owned LLSA kernel: the forward pass and, with ``BWD=True``, dq over the same key set.

A query's key set is segment 0 (the fine tokens of the blocks its level-1 token picked), the enriched
candidate segments (children of the picks of its level-(l+1) ancestor) and, when ``TOP``, every coarsest
token. All but segment 0 are shared by the queries under one level-2 ancestor, so a program takes a tile of
up to 128 of them through those keys as dense tiles and then (``FUSED``) each of its query blocks through
its own fine tokens as batched products; the split runs do the two parts in separate launches merged
through the log-sum-exp. Weights enter as a log2 bias, so reweighting costs one add per score. ``META`` rows
are ``Layout.meta``'s (6 int64 per level).

``EVEN`` (set by the launcher) says that every tile of every loop is full and every token of a level covers
its whole span, as when N is a multiple of B^L and the steps divide the pick counts: the key loops then load
unmasked, and a tile's one weight joins each query's running max in the offset of its exp2, so a score costs
one FFMA before it instead of a multiply, an add per key weight and a subtraction.
"""
import triton
import triton.language as tl

from llsa.ops.common import K_LN2, K_LOG2E
from llsa.ops.llsa.layout import POOL_OFF, SEL_OFF, SIZE, SPAN, WIDTH, level_field


@triton.jit
def _cand_rows(p_row, b_pick, k_up, i_it, n_l, o_n, B: tl.constexpr, KPI: tl.constexpr, KW: tl.constexpr,
               EVEN: tl.constexpr):
    """Rows of tile ``i_it`` of a candidate segment: children of picks ``i_it*KPI ..`` of one ancestor, as
    int32 indices into their level (callers widen them for addresses), and which of them exist.

    With ``KW`` the picks come from ``b_pick``, all of the list loaded before the loop: a load here would put
    a round trip to memory in front of the step's key loads, which the pipeliner then cannot issue early.
    A register tensor cannot be indexed, so a step takes its picks with a compare and a sum over the KW."""
    o_slot = i_it * KPI + o_n // B
    m_slot = o_slot < k_up
    if KW > 0:
        b_u = tl.sum(tl.where(tl.arange(0, KW)[None, :] == o_slot[:, None], b_pick[None, :], 0), 1)
    elif EVEN:
        b_u = tl.load(p_row + o_slot)
    else:
        b_u = tl.load(p_row + o_slot, mask=m_slot, other=0)
    o_row = b_u * B + o_n % B
    return o_row, m_slot & (o_row < n_l)


@triton.jit
def _level_log2_weights(span, n_l, n):
    """log2 of the token counts of a level whose tokens cover ``span`` originals each: every token's but the
    last (of ``n_l``), and the last's, which covers what is left of the ``n`` originals."""
    return tl.log2(tl.cast(span, tl.float32)), tl.log2(tl.cast(n - (n_l - 1) * span, tl.float32))


@triton.jit
def _log2_weight(o_row, m_row, n_l, w_full, w_last, REWEIGHT: tl.constexpr, EVEN: tl.constexpr):
    """log2 of each key's weight (its token count when reweighting), -inf for keys that don't exist; with
    ``EVEN`` one scalar for the whole tile. The two counts a level has come from ``_level_log2_weights``
    outside the key loop: a log2 per key would cost ~20 instructions each."""
    if EVEN:
        if REWEIGHT:
            b_w = w_full
        else:
            b_w = 0.0
    else:
        if REWEIGHT:
            b_w = tl.where(o_row == n_l - 1, w_last, w_full)
        else:
            b_w = tl.zeros(o_row.shape, dtype=tl.float32)
        b_w = tl.where(m_row, b_w, float("-inf"))
    return b_w


@triton.jit
def _row_offsets(o_row, D: tl.constexpr, WIDE: tl.constexpr):
    """Element offsets of rows ``o_row`` of a [rows, D] slab: int32 (one wide multiply-add per address
    later) unless ``WIDE``, which the launcher sets where a slab can hold 2^31 elements."""
    if WIDE:
        return o_row.to(tl.int64) * D
    else:
        return o_row * D


@triton.jit
def _bq(x, SWAP: tl.constexpr):
    """A per-query vector broadcast against a query tile: [BM] -> [BM, 1], or [1, BM] when swapped."""
    if SWAP:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _bk(x, SWAP: tl.constexpr):
    """A per-key vector broadcast against a score tile: [BN] -> [1, BN], or [BN, 1] when swapped."""
    if SWAP:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _query_max(x, SWAP: tl.constexpr):
    """Each query's largest value in a score tile (over its keys: axis 1, or 0 when swapped)."""
    if SWAP:
        return tl.max(x, 0)
    else:
        return tl.max(x, 1)


@triton.jit
def _logits_max(b_s, b_bias, qk_scale, SWAP: tl.constexpr, EVEN: tl.constexpr):
    """Each query's largest log2-logit in a tile of raw scores (``qk_scale`` > 0 with ``EVEN``, so the
    largest raw score gives it)."""
    if EVEN:
        return _query_max(b_s, SWAP) * qk_scale + b_bias
    else:
        return _query_max(b_s * qk_scale + _bk(b_bias, SWAP), SWAP)


@triton.jit
def _exp2_logits(b_s, b_bias, b_off, qk_scale, SWAP: tl.constexpr, EVEN: tl.constexpr):
    """exp2 of raw scores scaled to log2 units, plus each key's log2 weight and each query's ``b_off``
    (minus its running max, or minus its log2-sum-exp). With ``EVEN`` the weight is the tile's one scalar
    and joins the query's offset: one FFMA per score."""
    if EVEN:
        return tl.math.exp2(b_s * qk_scale + _bq(b_bias + b_off, SWAP))
    else:
        return tl.math.exp2(b_s * qk_scale + _bk(b_bias, SWAP) + _bq(b_off, SWAP))


@triton.jit
def _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc, b_m, b_l, qk_scale,
            D: tl.constexpr, BWD: tl.constexpr, SWAP: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
            EVEN: tl.constexpr):
    """One key tile of the online softmax (or of dq). With ``SWAP`` the query tiles are transposed,
    [D, BM], so every product has the BN keys or the D channels as its row dimension: Hopper's wgmma
    needs 64 rows, which a 16-query block alone cannot give."""
    # [BN, D]
    p_kv = _row_offsets(o_row, D, WIDE)[:, None] + o_d[None, :]
    if EVEN:
        b_k = tl.load(p_k + p_kv)
        b_v = tl.load(p_v + p_kv)
    else:
        b_k = tl.load(p_k + p_kv, mask=m_row[:, None], other=0.)
        b_v = tl.load(p_v + p_kv, mask=m_row[:, None], other=0.)
    if SWAP:
        # [BN, BM]
        b_s = tl.dot(b_k, b_q, input_precision=PREC)
    else:
        # [BM, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    if BWD:
        b_p = _exp2_logits(b_s, b_bias, -b_lse2, qk_scale, SWAP, EVEN)
        if SWAP:
            b_dp = tl.dot(b_v, b_do, input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[None, :])
            # [D, BM]
            b_acc += tl.dot(tl.trans(b_k), b_ds.to(b_k.dtype), input_precision=PREC)
        else:
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            # [BM, D]
            b_acc += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    else:
        b_mn = tl.maximum(b_m, _logits_max(b_s, b_bias, qk_scale, SWAP, EVEN))
        b_p = _exp2_logits(b_s, b_bias, -b_mn, qk_scale, SWAP, EVEN)
        b_alpha = tl.math.exp2(b_m - b_mn)
        if SWAP:
            b_l = b_l * b_alpha + tl.sum(b_p, 0)
            b_acc = b_acc * b_alpha[None, :] + tl.dot(tl.trans(b_v), b_p.to(b_v.dtype), input_precision=PREC)
        else:
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn
    return b_acc, b_m, b_l


@triton.jit
def _fine_logits(x, qk_scale, EVEN: tl.constexpr):
    """Log2-logits of the fine segment's scores, which ``EVEN`` leaves raw until here (so scaling joins the
    exp2's offset in one FFMA); without it they arrive scaled and masked."""
    if EVEN:
        return x * qk_scale
    else:
        return x


@triton.jit
def _fused_fine(p_q, p_do, b_lse2, b_delta, b_acc, b_m, b_l, p_k, p_v, p_pick, k_up, n_blk, i_qb, o_m, N, qk_scale,
                p_o, p_lse, B: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, KPI: tl.constexpr,
                BWD: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr, EVEN: tl.constexpr, KW: tl.constexpr):
    """The fine segment of a whole query tile after its shared part, then the tile's output: o and lse
    (continuing the shared part's online softmax), or dq (adding to the shared part's sum).

    The tile's BM / B query blocks each gather their own picked key blocks, so the products are batched
    per query block, [G, B, D] x [G, D, BN]: no query reads another's keys, and the shared part's state
    never leaves the registers (the split passes write and re-read it as a float32 partial)."""
    G: tl.constexpr = BM // B
    BN: tl.constexpr = KPI * B
    o_g = tl.arange(0, G)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_g = (i_qb + o_g) < n_blk
    # [G, B]: the tile's rows grouped by query block
    o_m3 = tl.reshape(o_m, [G, B])
    m_m3 = o_m3 < N
    # [G, B, D]: q (and do) loaded again as 3-D tiles rather than reshaped from the shared part's 2-D ones,
    # whose staging in shared memory then puts the query blocks, not their rows, next to each other: every
    # matrix load of 8 rows hit one bank (an 8-way conflict on half the pass's shared loads, ncu)
    p_qd3 = o_m3[:, :, None] * D + o_d[None, None, :]
    b_q3 = tl.load(p_q + p_qd3, mask=m_m3[:, :, None], other=0.)
    b_acc3 = tl.reshape(b_acc, [G, B, D])
    if BWD:
        b_do3 = tl.load(p_do + p_qd3, mask=m_m3[:, :, None], other=0.)
        b_lse3 = tl.reshape(b_lse2, [G, B])
        b_delta3 = tl.reshape(b_delta, [G, B])
    else:
        b_m3 = tl.reshape(b_m, [G, B])
        b_l3 = tl.reshape(b_l, [G, B])
    # [G]: where each query block's picks start
    o_pick = (i_qb + o_g) * k_up
    if KW > 0:
        o_kw = tl.arange(0, KW)
        # [G, KW]: all the tile's picks, loaded once (see _cand_rows)
        b_pick = tl.load(p_pick + o_pick[:, None] + o_kw[None, :], mask=m_g[:, None] & (o_kw < k_up)[None, :],
                         other=0)
    for i_it in range(0, tl.cdiv(k_up, KPI)):
        o_slot = i_it * KPI + o_n // B
        m_gn = m_g[:, None] & (o_slot < k_up)[None, :]
        # [G, BN]: the pick each key row comes from
        if KW > 0:
            b_u = tl.sum(tl.where(o_kw[None, None, :] == o_slot[None, :, None], b_pick[:, None, :], 0), 2)
        elif EVEN:
            b_u = tl.load(p_pick + o_pick[:, None] + o_slot[None, :])
        else:
            b_u = tl.load(p_pick + o_pick[:, None] + o_slot[None, :], mask=m_gn, other=0)
        o_row = b_u * B + (o_n % B)[None, :]
        if EVEN:
            # [G, BN, D]
            o_kv = _row_offsets(o_row, D, WIDE)[:, :, None] + o_d[None, None, :]
            b_k = tl.load(p_k + o_kv)
            b_v = tl.load(p_v + o_kv)
            # [G, B, BN]: raw scores; the scale joins the exp2's offset below
            b_s = tl.dot(b_q3, tl.permute(b_k, (0, 2, 1)), input_precision=PREC)
        else:
            m_row = m_gn & (o_row < N)
            # [G, BN, D]
            o_kv = _row_offsets(o_row, D, WIDE)[:, :, None] + o_d[None, None, :]
            b_k = tl.load(p_k + o_kv, mask=m_row[:, :, None], other=0.)
            b_v = tl.load(p_v + o_kv, mask=m_row[:, :, None], other=0.)
            # [G, B, BN]: scaled here, so the -inf of missing keys survives any scale
            b_s = tl.dot(b_q3, tl.permute(b_k, (0, 2, 1)), input_precision=PREC) * qk_scale
            b_s = tl.where(m_row[:, None, :], b_s, float("-inf"))
        if BWD:
            b_p = tl.math.exp2(_fine_logits(b_s, qk_scale, EVEN) - b_lse3[:, :, None])
            b_dp = tl.dot(b_do3, tl.permute(b_v, (0, 2, 1)), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta3[:, :, None])
            b_acc3 += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
        else:
            b_mn = tl.maximum(b_m3, _fine_logits(tl.max(b_s, 2), qk_scale, EVEN))
            b_p = tl.math.exp2(_fine_logits(b_s, qk_scale, EVEN) - b_mn[:, :, None])
            b_alpha = tl.math.exp2(b_m3 - b_mn)
            b_l3 = b_l3 * b_alpha + tl.sum(b_p, 2)
            b_acc3 = b_acc3 * b_alpha[:, :, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
            b_m3 = b_mn
    if BWD:
        b_o = b_acc3 * (qk_scale * K_LN2)
    else:
        tl.store(p_lse + o_m3, (b_m3 + tl.log2(b_l3)) * K_LN2, mask=m_m3)
        b_o = b_acc3 / b_l3[:, :, None]
    tl.store(p_o + o_m3[:, :, None] * D + o_d[None, None, :], b_o.to(p_o.dtype.element_ty), mask=m_m3[:, :, None])


@triton.jit
def llsa_q_kernel(Q, K, V, PKV, kv_plane, SEL, META, O, DO, LSE, DELTA, OUT, PART, PLSE, N, n_pool, n_sel, n_seg,
                  levels, qk_scale, B: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, KPI: tl.constexpr,
                  BT: tl.constexpr, FINE: tl.constexpr, SHARED: tl.constexpr, MERGE: tl.constexpr,
                  TOP: tl.constexpr, REWEIGHT: tl.constexpr, BWD: tl.constexpr, SWAP: tl.constexpr, PREC: tl.constexpr,
                  WIDE: tl.constexpr, FUSED: tl.constexpr = False, FKPI: tl.constexpr = 1,
                  MAKE_DELTA: tl.constexpr = False, EVEN: tl.constexpr = False, KW: tl.constexpr = 0):
    """Forward (OUT = o, LSE written) or dq (OUT = dq; LSE and DELTA read) for BM queries. PKV holds the
    pooled keys, and the pooled values ``kv_plane`` elements further.

    ``FINE``: segment 0, whose keys differ per query block, so BM = B. ``SHARED``: the enriched candidate
    segments and the coarsest level (BT contiguous keys per step), whose keys all BM queries share (BM <= B^2
    keeps a tile under one level-2 ancestor). Split runs write the shared part to PART (o and its LSE in
    PLSE, or dq) and the fine run merges it (``MERGE``) through the log-sum-exp. ``FUSED`` (with ``SHARED``):
    the same program then runs the fine segment of its BM / B query blocks, FKPI picked blocks per step, and
    writes the result.
    ``MAKE_DELTA`` (fused dq): delta = rowsum(o * do) is computed here from O and written to DELTA for the
    kernels after it, instead of read. ``WIDE``: row offsets within one head's keys in int64 (see
    ``_row_offsets``). ``EVEN``: every tile full and every token whole (module docstring). ``KW`` > 0: each
    pick list (at most KW long) is loaded whole before its loop (``_cand_rows``).
    """
    BN: tl.constexpr = KPI * B
    PK = PKV
    PV = PKV + kv_plane
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
        b_lse2 = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.) * K_LOG2E
        if MAKE_DELTA:
            # [BM, D] (MAKE_DELTA is the fused pass's, never swapped)
            b_o = tl.load(O + p_qd, mask=m_qd, other=0.).to(tl.float32) * b_do.to(tl.float32)
            b_delta = tl.sum(b_o, 1)
            tl.store(DELTA + i_bh * N + o_m, b_delta, mask=m_m)
        else:
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
        # row indices and counts within a level fit int32, which halves the cost of comparing them per key
        n_l = level_field(META, lv, SIZE).to(tl.int32)
        off_l = level_field(META, lv, POOL_OFF)
        span_l = level_field(META, lv, SPAN)
        k_up = level_field(META, lv + 1, WIDTH).to(tl.int32)
        sel_up = level_field(META, lv + 1, SEL_OFF)
        if lv == 0:
            p_k = K + i_bh * N * D
            p_v = V + i_bh * N * D
        else:
            p_k = PK + (i_bh * n_pool + off_l) * D
            p_v = PV + (i_bh * n_pool + off_l) * D
        # the level-(lv+1) ancestor of these queries owns the candidate list
        p_row = p_sel + sel_up + (i_qb // span_l) * k_up
        w_full, w_last = _level_log2_weights(span_l, n_l, N)
        if KW > 0:
            o_kw = tl.arange(0, KW)
            # [KW]
            b_pick = tl.load(p_row + o_kw, mask=o_kw < k_up, other=0)
        else:
            b_pick = None
        for i_it in range(0, tl.cdiv(k_up, KPI)):
            o_row, m_row = _cand_rows(p_row, b_pick, k_up, i_it, n_l, o_n, B, KPI, KW, EVEN)
            b_bias = _log2_weight(o_row, m_row, n_l, w_full, w_last, REWEIGHT, EVEN)
            b_acc, b_m, b_l = _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc,
                                      b_m, b_l, qk_scale, D, BWD, SWAP, PREC, WIDE, EVEN)
    if SHARED and TOP:
        n_t = level_field(META, levels, SIZE).to(tl.int32)
        off_t = level_field(META, levels, POOL_OFF)
        span_t = level_field(META, levels, SPAN)
        p_k = PK + (i_bh * n_pool + off_t) * D
        p_v = PV + (i_bh * n_pool + off_t) * D
        w_full, w_last = _level_log2_weights(span_t, n_t, N)
        o_t = tl.arange(0, BT)
        for i_it in range(0, tl.cdiv(n_t, BT)):
            o_row = i_it * BT + o_t
            m_row = o_row < n_t
            b_bias = _log2_weight(o_row, m_row, n_t, w_full, w_last, REWEIGHT, EVEN)
            b_acc, b_m, b_l = _q_tile(b_q, b_do, b_lse2, b_delta, p_k, p_v, o_row, m_row, o_d, b_bias, b_acc,
                                      b_m, b_l, qk_scale, D, BWD, SWAP, PREC, WIDE, EVEN)
    if FUSED:
        # level 1's picks hold each query block's fine key blocks
        _fused_fine(Q + i_bh * N * D, DO + i_bh * N * D, b_lse2, b_delta, b_acc, b_m, b_l, K + i_bh * N * D,
                    V + i_bh * N * D, p_sel + level_field(META, 1, SEL_OFF), level_field(META, 1, WIDTH),
                    level_field(META, 1, SIZE), i_qb, o_m, N, qk_scale, OUT + i_bh * N * D, LSE + i_bh * N, B, BM, D, FKPI, BWD, PREC, WIDE,
                    EVEN, KW)
    else:
        if BWD:
            b_out = b_acc * (qk_scale * K_LN2)
            if MERGE:
                b_out += tl.load(PART + p_qd, mask=m_qd, other=0.)
        else:
            if MERGE:
                # [BM, D], [BM]: the shared part, normalised, and its log2-sum-exp
                b_po = tl.load(PART + p_qd, mask=m_qd, other=0.)
                b_plse2 = tl.load(PLSE + i_bh * N + o_m, mask=m_m, other=0.) * K_LOG2E
                b_mn = tl.maximum(b_m, b_plse2)
                b_alpha = tl.math.exp2(b_m - b_mn)
                b_beta = tl.math.exp2(b_plse2 - b_mn)
                b_acc = b_acc * _bq(b_alpha, SWAP) + b_po * _bq(b_beta, SWAP)
                b_l = b_l * b_alpha + b_beta
                b_m = b_mn
            b_out = b_acc / _bq(b_l, SWAP)
            tl.store(LSE + i_bh * N + o_m, (b_m + tl.log2(b_l)) * K_LN2, mask=m_m)
        tl.store(OUT + p_qd, b_out.to(OUT.dtype.element_ty), mask=m_qd)
