"""The one sparse transpose every op uses: query-major picks into key-major lists (CSR -> CSC), linear in
the number of picks.

For ``n`` query tokens (or blocks) that pick ``w`` of ``n`` key tokens each, ``rowptr[bh, u] ..
rowptr[bh, u+1]`` delimits, in ``idx[bh]``, the picks of key ``u``, each as its flat position ``a*w + s``
in the pick list (query ``a``, slot ``s``): kernels take the query as ``pos // w`` and, where they need
it (LLSA's candidate partials), the slot.

The default path counts with atomics, prefix-sums and fills through atomic cursors, so the order inside
one list depends on scheduling; the deterministic path orders each list by query index with a stable sort
(O(P log P) instead of O(P) for P picks).
"""
import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def count_kernel(SEL, CNT, n_pick, sel_off, stride_s, n_keys, BLOCK: tl.constexpr):
    i_e, i_bh = tl.program_id(0), tl.program_id(1)
    o_e = i_e.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < n_pick
    b_u = tl.load(SEL + i_bh.to(tl.int64) * stride_s + sel_off + o_e, mask=m_e, other=0).to(tl.int64)
    tl.atomic_add(CNT + i_bh.to(tl.int64) * (n_keys + 1) + b_u + 1, 1, mask=m_e)


@triton.jit
def fill_kernel(SEL, ROWPTR, CURSOR, IDX, n_pick, sel_off, stride_s, n_keys, BLOCK: tl.constexpr):
    i_e, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    o_e = i_e.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < n_pick
    b_u = tl.load(SEL + i_bh * stride_s + sel_off + o_e, mask=m_e, other=0).to(tl.int64)
    b_slot = tl.atomic_add(CURSOR + i_bh * n_keys + b_u, 1, mask=m_e)
    b_start = tl.load(ROWPTR + i_bh * (n_keys + 1) + b_u, mask=m_e, other=0)
    tl.store(IDX + i_bh * n_pick + b_start + b_slot, o_e.to(tl.int32), mask=m_e)


def transpose_picks(sel: torch.Tensor, n: int, width: int, sel_off: int = 0,
                    deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-major lists of the picks ``sel[:, sel_off : sel_off + n*width]`` (BH rows, any integer dtype).

    Returns ``rowptr`` (BH, n+1) int64 and ``idx`` (BH, n*width) int32 (flat pick positions).
    """
    bh = sel.shape[0]
    n_pick = n * width
    # the kernels walk a row as consecutive elements and step rows by the row stride, so a view whose rows
    # are spaced apart (a slice of larger picks) is read in place; only a strided last dim needs a copy
    if sel.stride(1) != 1:
        sel = sel.contiguous()
    flat = sel[:, sel_off:sel_off + n_pick]
    if deterministic:
        keys, order = torch.sort(flat.long(), dim=1, stable=True)
        counts = torch.zeros(bh, n + 1, dtype=torch.int64, device=sel.device)
        counts[:, 1:].scatter_add_(1, keys, torch.ones_like(keys))
        return counts.cumsum(1), order.to(torch.int32)
    counts = torch.zeros(bh, n + 1, dtype=torch.int32, device=sel.device)
    grid = (triton.cdiv(n_pick, BLOCK), bh)
    count_kernel[grid](sel, counts, n_pick, sel_off, sel.stride(0), n, BLOCK=BLOCK)
    rowptr = counts.cumsum(1)
    cursor = torch.zeros(bh, n, dtype=torch.int32, device=sel.device)
    idx = torch.full((bh, n_pick), -1, dtype=torch.int32, device=sel.device)
    fill_kernel[grid](sel, rowptr, cursor, idx, n_pick, sel_off, sel.stride(0), n, BLOCK=BLOCK)
    return rowptr, idx
