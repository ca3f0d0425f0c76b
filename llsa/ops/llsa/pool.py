"""Mean pooling of q, k, v into levels 1..L (Triton), one pass per level or per two levels.

Level 1 averages original tokens; level l > 1 averages level l-1 means weighted by their token counts,
which is the mean over the original tokens, partial trailing blocks included. A program whose input rows
cover whole level-(l+1) tokens writes those too, from the same sums, so two levels take one launch.
"""
import torch
import triton
import triton.language as tl

from llsa.ops.llsa.layout import Layout


@triton.jit
def _pool_one(X, Y, C, i_bh, i_t, o_d, n_in, n_out, n_total, span_in, stride_x, x_off, stride_y, y_off, n_out2,
              y2_off, B: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, WEIGHTED: tl.constexpr,
              TWO: tl.constexpr, CAST: tl.constexpr, F32: tl.constexpr, F32_2: tl.constexpr):
    """One tensor's means into Y (float32; the first level's only with ``F32``, the second's with ``F32_2``)
    and, with ``CAST``, into C in C's dtype at the same offsets."""
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    # [BT, B]: the input rows under each of the BT output tokens, contiguous in memory
    o_r = o_t[:, None] * B + tl.arange(0, B)[None, :]
    m_r = o_r < n_in
    p_x = X + i_bh.to(tl.int64) * stride_x + (x_off + o_r)[:, :, None] * D + o_d[None, None, :]
    # [BT, B, D]
    b_x = tl.load(p_x, mask=m_r[:, :, None], other=0.).to(tl.float32)
    if WEIGHTED:
        # tokens under input row r: min((r+1)*span, N) - r*span
        b_w = tl.minimum((o_r + 1) * span_in, n_total) - o_r * span_in
        b_w = tl.where(m_r, b_w, 0).to(tl.float32)
    else:
        b_w = m_r.to(tl.float32)
    # [BT, D]
    b_sum = tl.sum(b_x * b_w[:, :, None], axis=1)
    # [BT]
    b_cnt = tl.sum(b_w, axis=1)
    b_y = b_sum / tl.maximum(b_cnt, 1.0)[:, None]
    o_y = i_bh.to(tl.int64) * stride_y + (y_off + o_t)[:, None] * D + o_d[None, :]
    m_y = (o_t < n_out)[:, None]
    if F32:
        tl.store(Y + o_y, b_y, mask=m_y)
    if CAST:
        tl.store(C + o_y, b_y.to(C.dtype.element_ty), mask=m_y)
    if TWO:
        # [BT // B, D]: the next level's tokens over these BT, as the total over their tokens
        b_sum2 = tl.sum(tl.reshape(b_sum, [BT // B, B, D]), axis=1)
        b_cnt2 = tl.sum(tl.reshape(b_cnt, [BT // B, B]), axis=1)
        o_t2 = i_t.to(tl.int64) * (BT // B) + tl.arange(0, BT // B)
        o_y2 = i_bh.to(tl.int64) * stride_y + (y2_off + o_t2)[:, None] * D + o_d[None, :]
        m_y2 = (o_t2 < n_out2)[:, None]
        b_y2 = b_sum2 / tl.maximum(b_cnt2, 1.0)[:, None]
        if F32_2:
            tl.store(Y + o_y2, b_y2, mask=m_y2)
        if CAST:
            tl.store(C + o_y2, b_y2.to(C.dtype.element_ty), mask=m_y2)


@triton.jit
def pool_kernel(XQ, XK, XV, Y, C, x_plane, y_plane, n_in, n_out, n_total, span_in, stride_x, x_off, stride_y, y_off,
                n_out2, y2_off, B: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, WEIGHTED: tl.constexpr,
                TWO: tl.constexpr, CAST: tl.constexpr, V32: tl.constexpr, V32_2: tl.constexpr):
    """BT level-l means of q, k and v from BT*B rows of level l-1 (and, with ``TWO``, the level-(l+1) means
    over them), for one (batch, head). Inputs are XQ, XK + x_plane, XV + 2*x_plane (three tensors, or the
    planes of Y); outputs go to the planes of Y (float32, ``y_plane`` elements apart), and with ``CAST`` the
    k and v means also into the two planes of C (the attention kernels' copies, in the inputs' dtype). The
    float32 v means are written only with ``V32`` (the first level) and ``V32_2`` (the second)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, D)
    _pool_one(XQ, Y, Y, i_bh, i_t, o_d, n_in, n_out, n_total, span_in, stride_x, x_off, stride_y, y_off, n_out2,
              y2_off, B, D, BT, WEIGHTED, TWO, False, True, True)
    _pool_one(XK + x_plane, Y + y_plane, C, i_bh, i_t, o_d, n_in, n_out, n_total, span_in, stride_x, x_off,
              stride_y, y_off, n_out2, y2_off, B, D, BT, WEIGHTED, TWO, CAST, True, True)
    _pool_one(XV + 2 * x_plane, Y + 2 * y_plane, C + y_plane, i_bh, i_t, o_d, n_in, n_out, n_total, span_in,
              stride_x, x_off, stride_y, y_off, n_out2, y2_off, B, D, BT, WEIGHTED, TWO, CAST, V32, V32_2)


def pool_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, rows: int = 128, warps: int = 4,
             kv_out: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled means of levels 1..L for contiguous q, k, v of shape (..., N, D), every leading dim a (batch,
    head); each program reads ``rows`` input rows (a power of two) of each.

    Returns float32 ``(3, BH, n_pool, D)``: q, k, v stacked, levels stacked along rows as ``lay.pool_off``.
    ``kv_out`` (2, BH, n_pool, D), if given, receives the pooled k and v in its own dtype as well; the float32
    v plane then holds only the levels a later launch pools from (selection reads q and k, the attention
    kernels kv_out), which saves a quarter of the bytes pooling writes.
    """
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    out = torch.empty((3, bh, lay.n_pool, d), dtype=torch.float32, device=q.device)
    cast = kv_out is not None
    if cast and (kv_out.shape != (2, bh, lay.n_pool, d) or not kv_out.is_contiguous()):
        raise ValueError(f"kv_out must be a contiguous {(2, bh, lay.n_pool, d)} tensor; got {tuple(kv_out.shape)} "
                         f"with strides {kv_out.stride()}")
    plane = bh * lay.n_pool * d
    # without copies to make, C is never written
    c = kv_out if cast else out
    bt = max(1, rows // lay.block)
    src, x_plane, stride_x, x_off = (q, k, v), 0, n * d, 0
    level = 1
    while level <= lay.levels:
        n_in, n_out = lay.sizes[level - 1], lay.sizes[level]
        two = level < lay.levels and bt % lay.block == 0
        top = level + 1 if two else level
        grid = (triton.cdiv(n_out, bt), bh)
        # the next launch, if any, pools level ``top`` from the float32 planes
        later = top < lay.levels
        pool_kernel[grid](*src, out, c, x_plane, plane, n_in, n_out, n, lay.spans[level - 1], stride_x, x_off,
                          lay.n_pool * d, lay.pool_off[level], lay.sizes[top], lay.pool_off[top], B=lay.block, D=d,
                          BT=bt, WEIGHTED=level > 1, TWO=two, CAST=cast, V32=not cast or (later and not two),
                          V32_2=not cast or later, num_warps=warps)
        src, x_plane, stride_x, x_off = (out, out, out), plane, lay.n_pool * d, lay.pool_off[top]
        level = top + 1
    return out
