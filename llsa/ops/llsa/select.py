"""Hierarchical top-K selection: dense at the coarsest level, sparse (K*B candidates) below it.

Picks are written in ascending index order, so the kernels and the reference agree element for element.
"""
import torch
import triton
import triton.language as tl

from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.levels import top_smallest_ties
from llsa.ops.poison import poison

# Three tf32 products recover fp32 accuracy on tensor cores; near-ties may still order differently
# from a float32 matmul, exactly as two float32 summation orders do.
SELECT_PREC = "tf32x3"
# Rows of the coarsest score matrix scored at once: bounds its memory when L is small and N large.
TOP_CHUNK = 2048
# Up to this many coarsest tokens, one kernel scores and picks them; beyond it, chunked torch sorts.
DENSE_MAX = 1024


@triton.jit
def select_kernel(P, plane, SEL, n_l, k_up, k_out, sel_off_l, sel_off_up, pool_off_l, stride_p, stride_s,
                  B: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, KUP: tl.constexpr, KOUT: tl.constexpr,
                  DENSE: tl.constexpr, PREC: tl.constexpr):
    """One program per level-(l+1) parent: its B children (sibling query tokens) share the K*B candidates.

    ``DENSE`` (the coarsest level): the program takes B consecutive query tokens and every one of the
    ``n_l <= KUP*B`` tokens is a candidate. P holds the pooled queries, and the pooled keys ``plane``
    elements further.
    """
    i_up, i_bh = tl.program_id(0), tl.program_id(1)
    i_up = i_up.to(tl.int64)
    p_pq = P + i_bh.to(tl.int64) * stride_p
    p_pk = P + plane + i_bh.to(tl.int64) * stride_p
    p_sel = SEL + i_bh.to(tl.int64) * stride_s
    o_s = tl.arange(0, B)
    o_q = i_up * B + o_s
    m_q = o_q < n_l
    o_c = tl.arange(0, KUP * B)
    if DENSE:
        b_cand = o_c.to(tl.int64)
        m_c = b_cand < n_l
    else:
        o_slot = o_c // B
        m_slot = o_slot < k_up
        b_up = tl.load(p_sel + sel_off_up + i_up * k_up + o_slot, mask=m_slot, other=0).to(tl.int64)
        # [KUP*B] candidate indices at level l, ascending
        b_cand = b_up * B + o_c % B
        m_c = m_slot & (b_cand < n_l)
    # [B, KUP*B]
    b_s = tl.zeros([B, KUP * B], dtype=tl.float32)
    for i_d in range(0, D, DC):
        o_d = i_d + tl.arange(0, DC)
        # [B, DC]
        b_q = tl.load(p_pq + (pool_off_l + o_q)[:, None] * D + o_d[None, :], mask=m_q[:, None], other=0.)
        # [KUP*B, DC]
        b_k = tl.load(p_pk + (pool_off_l + b_cand)[:, None] * D + o_d[None, :], mask=m_c[:, None], other=0.)
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_s = tl.where(m_c[None, :], b_s, float("-inf"))
    # tie-break keys in int32 (n_l < 2^31): the reductions below cost half what int64 ones do
    big = 2147483647
    b_key = tl.where(m_c, b_cand, big).to(tl.int32)
    o_k = tl.arange(0, KOUT)
    # [B, KOUT]: each query's picks in the order found
    b_pick = tl.full([B, KOUT], big, dtype=tl.int32)
    for i_k in range(k_out):
        b_max = tl.max(b_s, axis=1)
        # ties go to the smaller index
        b_idx = tl.min(tl.where(b_s == b_max[:, None], b_key[None, :], big), axis=1)
        b_s = tl.where(b_key[None, :] == b_idx[:, None], float("-inf"), b_s)
        b_pick = tl.where(o_k[None, :] == i_k, b_idx[:, None], b_pick)
    tl.store(p_sel + sel_off_l + o_q[:, None] * k_out + o_k[None, :], tl.sort(b_pick, 1),
             mask=m_q[:, None] & (o_k < k_out)[None, :])


def select(pooled: torch.Tensor, lay: Layout, out: torch.Tensor | None = None, warps: int = 4,
           chunk: int = 32) -> torch.Tensor:
    """Picks of every level from float32 pooled (3, BH, n_pool, D) as int32 (BH, n_sel), written to ``out``
    if given (every element is written); below the coarsest level each program runs on ``warps`` warps and
    scores ``chunk`` channels per product."""
    _, bh, _, d = pooled.shape
    sel = torch.empty((bh, lay.n_sel), dtype=torch.int32, device=pooled.device) if out is None else out
    poison(sel)
    top = lay.levels
    n_top, off = lay.sizes[top], lay.pool_off[top]
    if n_top <= DENSE_MAX:
        nt = max(lay.block, triton.next_power_of_2(n_top))
        select_kernel[(triton.cdiv(n_top, lay.block), bh)](
            pooled, pooled.stride(0), sel, n_top, 0, lay.widths[top], lay.sel_off[top], 0, off, lay.n_pool * d,
            lay.n_sel, B=lay.block, D=d, DC=min(d, 32) if nt <= 256 else 16, KUP=nt // lay.block,
            KOUT=triton.next_power_of_2(lay.widths[top]), DENSE=True,
            PREC=SELECT_PREC, num_warps=4 if nt <= 256 else 8)
    else:
        q_top, k_top = pooled[0, :, off:off + n_top], pooled[1, :, off:off + n_top]
        cand = torch.arange(n_top, device=pooled.device)
        picks = []
        for start in range(0, n_top, TOP_CHUNK):
            scores = q_top[:, start:start + TOP_CHUNK] @ k_top.transpose(-1, -2)
            picks.append(top_smallest_ties(scores, cand.expand_as(scores), lay.widths[top]))
        s0 = lay.sel_off[top]
        sel[:, s0:s0 + n_top * lay.widths[top]] = torch.cat(picks, dim=1).flatten(1).to(torch.int32)
    for level in range(top - 1, 0, -1):
        k_up = lay.widths[level + 1]
        grid = (lay.sizes[level + 1], bh)
        select_kernel[grid](pooled, pooled.stride(0), sel, lay.sizes[level], k_up, lay.widths[level],
                            lay.sel_off[level], lay.sel_off[level + 1], lay.pool_off[level], lay.n_pool * d, lay.n_sel,
                            B=lay.block, D=d, DC=min(d, chunk), KUP=triton.next_power_of_2(k_up),
                            KOUT=triton.next_power_of_2(lay.widths[level]), DENSE=False,
                            PREC=SELECT_PREC, num_warps=warps)
    return sel


def unpack_sel(sel: torch.Tensor, lay: Layout, shape: tuple[int, int]) -> list[torch.Tensor]:
    """The flat pick buffer as ``hierarchical_topk``'s list of (b, h, n_l, K_l) int64 tensors."""
    out = []
    for level in range(1, lay.levels + 1):
        o, n, w = lay.sel_off[level], lay.sizes[level], lay.widths[level]
        out.append(sel[:, o:o + n * w].view(*shape, n, w).long())
    return out
