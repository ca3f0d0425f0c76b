"""Triton kernels for block-sparse attention over per-query-block lists of key blocks.

Tokens are cut into blocks of ``BS`` consecutive rows. Query block ``i`` attends the key blocks
``IDX[bh, i, 0:n_sel]``; a step of the inner loop gathers ``G`` of them (``G * BS`` key rows) into one
tile. Rows at or past ``N`` (the trailing partial block) are masked everywhere.

Two score modes share the loops:

* softmax (``LINEAR=False``): ``o = softmax(q k^T * scale) v`` over the selected keys; the forward
  saves the base-2 log-sum-exp, the backward recomputes probabilities from it (FlashAttention-2 style).
* linear (``LINEAR=True``): ``a = q k^T`` with no exponent, ``num = a v`` and ``den = rowsum(a)``, both
  kept in float32. SLA uses it with ``q, k`` already passed through its feature map and subtracts the
  result from global sums, so it takes float32 operands (nothing rounded to 16 bits).

``PREC`` is the ``tl.dot`` input precision: ``"ieee"`` for float32 operands that must match the
reference, ``"tf32x3"`` (three TF32 passes, about float32 accuracy on tensor cores) where speed matters;
it has no effect on 16-bit operands.

The backward is split so no two programs write one row: ``dq`` is owned by query blocks (walking the
query-major lists), ``dk, dv`` by key blocks (walking the key-major lists of ``transpose_picks``, whose
entries are flat pick positions ``query_block * n_sel + slot``).
"""
import triton
import triton.language as tl


@triton.jit
def _gather_rows(LIST, base, t, n_list, N, per, BS: tl.constexpr, G: tl.constexpr, FLAT: tl.constexpr):
    """Rows of the ``G`` blocks ``LIST[base + t : base + t + G]`` as one flat [G * BS] index vector.

    ``FLAT``: the entries are flat pick positions, so the block is ``entry // per``. Entries past
    ``n_list`` and rows past ``N`` are invalid; their index is clamped to row 0 so loads stay in bounds
    even without a mask.
    """
    o_n = tl.arange(0, G * BS)
    o_g = t + o_n // BS
    m_g = o_g < n_list
    # [G * BS]: the block id of every gathered row (repeated BS times)
    b_blk = tl.load(LIST + base + o_g, mask=m_g, other=0).to(tl.int64)
    if FLAT:
        b_blk = b_blk // per
    o_row = b_blk * BS + o_n % BS
    m_row = m_g & (o_row < N)
    return tl.where(m_row, o_row, 0), m_row


@triton.jit
def _fwd_kernel(Q, K, V, O, O32, LSE, DEN, IDX, N, NQ, n_sel, scale_log2,
                BS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, LINEAR: tl.constexpr,
                STORE_O32: tl.constexpr, PREC: tl.constexpr):
    """``STORE_O32``: also write the softmax output in float32. The backward's ``delta = rowsum(o do)``
    taken from the rounded output loses the cancellation in ``dp - delta`` when the softmax is peaked
    (large logits), which costs far more accuracy in dq, dk than the float32 copy costs memory."""
    i_q, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = i_bh * N * D
    o_m = i_q * BS + tl.arange(0, BS).to(tl.int64)
    m_m = o_m < N
    o_d = tl.arange(0, D)
    # [BS, D]
    b_q = tl.load(Q + base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
    # [BS, D]
    b_acc = tl.zeros([BS, D], dtype=tl.float32)
    # [BS]
    b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
    # [BS]
    b_l = tl.zeros([BS], dtype=tl.float32)
    idx_base = (i_bh * NQ + i_q) * n_sel
    for t in range(0, n_sel, G):
        o_n, m_n = _gather_rows(IDX, idx_base, t, n_sel, N, 1, BS, G, False)
        # [G * BS, D]
        b_k = tl.load(K + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [G * BS, D]
        b_v = tl.load(V + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [BS, G * BS]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        if LINEAR:
            b_a = tl.where(m_n[None, :], b_s, 0.0)
            b_acc += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC)
            b_l += tl.sum(b_a, 1)
        else:
            b_s = tl.where(m_n[None, :], b_s * scale_log2, float("-inf"))
            # [BS]
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            b_alpha = tl.exp2(b_m - b_m_new)
            # [BS, G * BS]
            b_p = tl.exp2(b_s - b_m_new[:, None])
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
            b_m = b_m_new
    p_o = O + base + o_m[:, None] * D + o_d[None, :]
    if LINEAR:
        tl.store(p_o, b_acc, mask=m_m[:, None])
        tl.store(DEN + i_bh * N + o_m, b_l, mask=m_m)
    else:
        # [BS, D]
        b_o = b_acc / b_l[:, None]
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None])
        if STORE_O32:
            tl.store(O32 + base + o_m[:, None] * D + o_d[None, :], b_o, mask=m_m[:, None])
        tl.store(LSE + i_bh * N + o_m, b_m + tl.log2(b_l), mask=m_m)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, IDX, N, NQ, n_sel, scale_log2, scale,
                   BS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, LINEAR: tl.constexpr,
                   PREC: tl.constexpr):
    """Query-owned dq. Softmax: ``ds = p (do v^T - delta)``. Linear: ``da = dnum v^T + dden``, with
    ``DO`` holding dnum and ``DELTA`` holding dden."""
    i_q, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = i_bh * N * D
    o_m = i_q * BS + tl.arange(0, BS).to(tl.int64)
    m_m = o_m < N
    o_d = tl.arange(0, D)
    # [BS, D]
    b_q = tl.load(Q + base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
    # [BS, D]
    b_do = tl.load(DO + base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
    # [BS]
    b_delta = tl.load(DELTA + i_bh * N + o_m, mask=m_m, other=0.0)
    # [BS]
    b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.0)
    # [BS, D]
    b_dq = tl.zeros([BS, D], dtype=tl.float32)
    idx_base = (i_bh * NQ + i_q) * n_sel
    for t in range(0, n_sel, G):
        o_n, m_n = _gather_rows(IDX, idx_base, t, n_sel, N, 1, BS, G, False)
        # [G * BS, D]
        b_k = tl.load(K + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [G * BS, D]
        b_v = tl.load(V + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
        # [BS, G * BS]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        if LINEAR:
            b_ds = tl.where(m_n[None, :], b_dp + b_delta[:, None], 0.0)
        else:
            # [BS, G * BS]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
            b_p = tl.where(m_n[None, :], tl.exp2(b_s * scale_log2 - b_lse[:, None]), 0.0)
            b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(DQ + base + o_m[:, None] * D + o_d[None, :], (b_dq * scale).to(DQ.dtype.element_ty),
             mask=m_m[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KSTART, KLIST, N, NQ, NK, n_sel, scale_log2, scale,
                     BS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, LINEAR: tl.constexpr,
                     PREC: tl.constexpr):
    """Key-owned dk, dv over the query blocks in the key-major list of key block ``i_k``."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = i_bh * N * D
    o_n = i_k * BS + tl.arange(0, BS).to(tl.int64)
    m_n = o_n < N
    o_d = tl.arange(0, D)
    # [BS, D]
    b_k = tl.load(K + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
    # [BS, D]
    b_v = tl.load(V + base + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
    # [BS, D]
    b_dk = tl.zeros([BS, D], dtype=tl.float32)
    # [BS, D]
    b_dv = tl.zeros([BS, D], dtype=tl.float32)
    start = tl.load(KSTART + i_bh * (NK + 1) + i_k)
    n_list = tl.load(KSTART + i_bh * (NK + 1) + i_k + 1) - start
    list_base = i_bh * NQ * n_sel + start
    for t in range(0, n_list, G):
        o_m, m_m = _gather_rows(KLIST, list_base, t, n_list, N, n_sel, BS, G, True)
        m_nm = m_n[:, None] & m_m[None, :]
        # [G * BS, D]
        b_q = tl.load(Q + base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
        # [G * BS, D]
        b_do = tl.load(DO + base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
        # [G * BS]
        b_delta = tl.load(DELTA + i_bh * N + o_m, mask=m_m, other=0.0)
        # [BS, G * BS]: scores transposed, keys along rows
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
        # [BS, G * BS]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        if LINEAR:
            b_pt = tl.where(m_nm, b_st, 0.0)
            b_dst = tl.where(m_nm, b_dpt + b_delta[None, :], 0.0)
        else:
            # [G * BS]
            b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=0.0)
            b_pt = tl.where(m_nm, tl.exp2(b_st * scale_log2 - b_lse[None, :]), 0.0)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    p_dk = DK + base + o_n[:, None] * D + o_d[None, :]
    tl.store(p_dk, (b_dk * scale).to(DK.dtype.element_ty), mask=m_n[:, None])
    tl.store(DV + base + o_n[:, None] * D + o_d[None, :], b_dv.to(DV.dtype.element_ty), mask=m_n[:, None])
