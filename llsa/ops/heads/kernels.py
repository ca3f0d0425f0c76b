"""Triton kernels of the head split and merge. One program owns BT tokens of one (batch, head).

``qkv`` rows are a Linear's output, [b, n, 3, heads, d]; q, k, v come out head-major, [b, heads, n, d].
The split normalises (RMSNorm over d, when ``NORM``) and rotates (RoPE on pairs 2i, 2i+1) q and k in fp32
on the way, so the model's pre-attention work is one read and one write of each tensor.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate(b_x, b_cos, b_sin, BT: tl.constexpr, D: tl.constexpr):
    """Pairs (2i, 2i+1) of each row of ``b_x`` [BT, D] turned by the angles behind ``b_cos, b_sin`` [BT, D/2];
    a negated ``b_sin`` turns them back."""
    b_x1, b_x2 = tl.split(tl.reshape(b_x, [BT, D // 2, 2]))
    return tl.reshape(tl.join(b_x1 * b_cos - b_x2 * b_sin, b_x1 * b_sin + b_x2 * b_cos), [BT, D])


@triton.jit
def _tile(COS, SIN, N, H, D: tl.constexpr, BT: tl.constexpr):
    """This program's BT tokens of one (batch, head): offsets [BT, D] of their q columns in the qkv rows and
    of their rows in the head-major tensors, the token mask [BT, 1], and their cos, sin [BT, D/2]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = (o_t < N)[:, None]
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, D // 2)
    o_in = (i_b * N + o_t[:, None]) * (3 * H * D) + i_h * D + o_d[None, :]
    o_out = (i_bh * N + o_t[:, None]) * D + o_d[None, :]
    b_cos = tl.load(COS + o_t[:, None] * (D // 2) + o_c[None, :], mask=m_t, other=0.)
    b_sin = tl.load(SIN + o_t[:, None] * (D // 2) + o_c[None, :], mask=m_t, other=0.)
    return o_in, o_out, m_t, b_cos, b_sin


@triton.jit
def split_fwd_kernel(QKV, COS, SIN, WQ, WK, Q, K, V, N, H, eps,
                     D: tl.constexpr, BT: tl.constexpr, NORM: tl.constexpr):
    o_in, o_out, m_t, b_cos, b_sin = _tile(COS, SIN, N, H, D, BT)
    o_d = tl.arange(0, D)
    for i_x in tl.static_range(2):
        # [BT, D]
        b_x = tl.load(QKV + o_in + i_x * H * D, mask=m_t, other=0.).to(tl.float32)
        if NORM:
            b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)
            b_w = tl.load((WQ if i_x == 0 else WK) + o_d).to(tl.float32)
            b_x = b_x * b_r[:, None] * b_w[None, :]
        b_y = _rotate(b_x, b_cos, b_sin, BT, D)
        p_y = Q if i_x == 0 else K
        tl.store(p_y + o_out, b_y.to(p_y.dtype.element_ty), mask=m_t)
    tl.store(V + o_out, tl.load(QKV + o_in + 2 * H * D, mask=m_t, other=0.), mask=m_t)


@triton.jit
def split_bwd_kernel(QKV, COS, SIN, WQ, WK, DQ, DK, DV, DQKV, DW, N, H, eps,
                     D: tl.constexpr, BT: tl.constexpr, NORM: tl.constexpr):
    """dqkv from dq, dk, dv; with ``NORM`` also each program's share of the norm weights' gradients,
    DW [2, programs, D] (summed by the launcher: no atomics, so the sum is reproducible)."""
    o_in, o_out, m_t, b_cos, b_sin = _tile(COS, SIN, N, H, D, BT)
    o_d = tl.arange(0, D)
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    i_prog = i_bh * tl.num_programs(0) + i_t
    for i_x in tl.static_range(2):
        # [BT, D]: the gradient at the rotation's input
        b_g = _rotate(tl.load((DQ if i_x == 0 else DK) + o_out, mask=m_t, other=0.).to(tl.float32),
                      b_cos, -b_sin, BT, D)
        if NORM:
            b_x = tl.load(QKV + o_in + i_x * H * D, mask=m_t, other=0.).to(tl.float32)
            b_r = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)
            b_xh = b_x * b_r[:, None]
            tl.store(DW + (i_x * n_prog + i_prog) * D + o_d, tl.sum(b_g * b_xh, 0))
            b_w = tl.load((WQ if i_x == 0 else WK) + o_d).to(tl.float32)
            b_gh = b_g * b_w[None, :]
            b_g = b_r[:, None] * (b_gh - b_xh * (tl.sum(b_gh * b_xh, 1) / D)[:, None])
        tl.store(DQKV + o_in + i_x * H * D, b_g.to(DQKV.dtype.element_ty), mask=m_t)
    tl.store(DQKV + o_in + 2 * H * D, tl.load(DV + o_out, mask=m_t, other=0.), mask=m_t)


@triton.jit
def merge_kernel(X, Y, N, H, D: tl.constexpr, BT: tl.constexpr, TO_TOKENS: tl.constexpr):
    """Head-major [b, heads, n, d] to token-major [b, n, heads * d] (``TO_TOKENS``), or back."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = (o_t < N)[:, None]
    o_d = tl.arange(0, D)
    o_heads = (i_bh * N + o_t[:, None]) * D + o_d[None, :]
    o_tokens = (i_b * N + o_t[:, None]) * (H * D) + i_h * D + o_d[None, :]
    if TO_TOKENS:
        tl.store(Y + o_tokens, tl.load(X + o_heads, mask=m_t, other=0.), mask=m_t)
    else:
        tl.store(Y + o_heads, tl.load(X + o_tokens, mask=m_t, other=0.), mask=m_t)
