"""Launchers of the LLSA kernels: the layout tables, the pooling and selection launches, the query-owned pass
and the whole forward and backward as kernel sequences writing caller-given buffers.

Launch shapes come from ``tuning.py``; the autograd and custom-op wrappers are in ``interface.py``.
"""
import threading
from dataclasses import dataclass

import torch
import triton

from llsa.ops.common import LOG2E
from llsa.ops.llsa import graphs
from llsa.ops.llsa.bwd import (delta_kernel, llsa_cand_kv_kernel, llsa_cand_reduce_kernel, llsa_kv_kernel,
                               llsa_top_kv_kernel)
from llsa.ops.llsa.fwd import llsa_q_kernel
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.pool import pool_qkv
from llsa.ops.llsa.select import select
from llsa.ops.common.transpose import transpose_picks
from llsa.ops.llsa.tuning import (HEAD_DIMS, INT32_SLAB, even, fused, fused_shape, fused_steps, pick_width,
                                  shared_rows, shared_steps, top_chunks, top_keys, tune)
from llsa.ops.poison import poison
from llsa.ops.validate import kernel_device_support


def kernel_support(q: torch.Tensor, block_size: int) -> str | None:
    """Why the kernels cannot run these inputs (None when they can)."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim D={d} is not one of {HEAD_DIMS}; pad the head dim or use backend='torch'"
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        return (f"block_size={block_size} must be a power of two in 16..128 for the kernels "
                "(16-row matrix tiles); use backend='torch' for smaller blocks")
    return kernel_device_support(q)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    # the kernels index (..., N, D) tensors as (BH, N, D) rows; a contiguous one is passed as it is
    return x if x.is_contiguous() else x.contiguous()


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# (n, block, topk, levels, enrich, device) -> (Layout, its kernel table on the device); never evicted (only
# clear_layouts() frees them): a table freed while another stream's kernels or a captured graph still read it
# could be handed out again.
_layouts: dict = {}


def layout(n: int, block: int, topk: int, levels: int, enrich: int, device: torch.device):
    key = (n, block, topk, levels, enrich, device)
    hit = _layouts.get(key)
    if hit is None:
        lay = Layout(n, block, topk, levels, enrich)
        hit = _layouts[key] = (lay, kernel_table(lay, device))
    return hit


def clear_layouts() -> None:
    """Free the cached layout tables, and with them every captured CUDA graph, whose kernels read the tables
    at the addresses they had at capture (a graph replayed after its table was freed reads freed memory)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    graphs.clear()
    _layouts.clear()


def kernel_table(lay: Layout, device: torch.device) -> torch.Tensor:
    """``lay.meta`` on ``device``, made on a thread of its own.

    torch.compile's reduce-overhead mode routes the calling thread's allocations into its CUDA-graph pool
    while it warms a graph up, and that pool may keep nothing beyond the graph's outputs: a table cached
    from there fails its check ("tensor(s) in the cudagraph pool not tracked as outputs").
    """
    if device.type != "cuda":
        return lay.meta(device)
    made = {}

    def make():
        try:
            made["table"] = lay.meta(device)
            # the copy from pageable host memory may still be in flight when torch.tensor returns
            torch.cuda.synchronize(device)
        except Exception as err:  # re-raised on the caller's thread
            made["error"] = err

    worker = threading.Thread(target=make, name="llsa-layout")
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    return made["table"]


def pool_tuned(q, k, v, lay: Layout, t: dict, kv_out: torch.Tensor | None = None) -> torch.Tensor:
    """``pool_qkv`` with the launch shapes ``t`` (``tune(d)``'s)."""
    return pool_qkv(q, k, v, lay, t["pool_rows"], t["pool_warps"], kv_out=kv_out)


def select_tuned(pooled: torch.Tensor, lay: Layout, t: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """``select`` with the launch shapes ``t`` (``tune(d)``'s)."""
    return select(pooled, lay, out=out, warps=t["select_warps"], chunk=t["select_chunk"])


@dataclass(slots=True)
class QueryPass:
    """The operands of one query-owned pass. The forward reads q, k, v, pooled k/v and picks and writes ``out``
    (o) and ``lse``; dq (``bwd``) also reads ``o``, ``do`` and ``delta`` (which the fused pass writes) and
    writes ``out`` (dq). ``part``, ``plse``: float32 partials of the split passes (None when fused). Operands a
    pass does not read default to tensors it may be handed unread (q, lse)."""
    lay: Layout
    meta: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pkv: torch.Tensor
    sel: torch.Tensor
    lse: torch.Tensor
    out: torch.Tensor
    qk_scale: float
    reweight: bool
    bwd: bool = False
    o: torch.Tensor | None = None
    do: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    part: torch.Tensor | None = None
    plse: torch.Tensor | None = None


def launch_query_pass(p: QueryPass, t: dict) -> None:
    """The query-owned pass (forward, or dq with ``bwd``) with the caller's launch shapes ``t``: one fused pass
    over query tiles (shared segments, then each query block's fine segment; fused dq also makes delta), or
    with ``fwd_fused`` / ``dq_fused`` off or no shared segments, split: shared segments in 128-query tiles,
    then the fine segment of each block, merged."""
    lay, meta, q, k, v, pkv, sel, lse, out = p.lay, p.meta, p.q, p.k, p.v, p.pkv, p.sel, p.lse, p.out
    qk_scale, reweight, bwd, part, plse = p.qk_scale, p.reweight, p.bwd, p.part, p.plse
    o = q if p.o is None else p.o
    do = q if p.do is None else p.do
    delta = lse if p.delta is None else p.delta
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    common = dict(D=d, B=lay.block, TOP=lay.top, REWEIGHT=reweight, BWD=bwd, PREC=precision(q.dtype),
                  WIDE=n * d >= INT32_SLAB)
    pre = "dq_" if bwd else "fwd_"
    if fused(lay, t, pre):
        shape = fused_shape(lay, t, pre)
        llsa_q_kernel[(triton.cdiv(n, shape["BM"]), bh)](
            q, k, v, pkv, pkv.stride(0), sel, meta, o, do, lse, delta, out, part, plse, n, lay.n_pool, lay.n_sel,
            lay.n_seg, lay.levels, qk_scale, FINE=False, SHARED=True, MERGE=False, SWAP=False, FUSED=True,
            MAKE_DELTA=bwd, EVEN=even(lay, qk_scale, shape["BM"], fused_steps(lay, shape)), **shape, **common)
        return
    kw = pick_width(lay, t)
    if lay.shared:
        bm = shared_rows(lay.block)
        kpi = max(1, t["shared_kpi"] * 16 // lay.block)
        bt = top_keys(lay, kpi * lay.block)
        llsa_q_kernel[(triton.cdiv(n, bm), bh)](
            q, k, v, pkv, pkv.stride(0), sel, meta, o, do, plse if not bwd else lse, delta, part, part, plse, n,
            lay.n_pool, lay.n_sel, lay.n_seg, lay.levels, qk_scale, BM=bm, FINE=False, SHARED=True,
            MERGE=False, SWAP=False, KPI=kpi, BT=bt, EVEN=even(lay, qk_scale, bm, shared_steps(lay, kpi, bt)),
            KW=kw, num_warps=t["shared_warps"], num_stages=t["shared_stages"], **common)
    kpi = max(1, t["fine_keys"] // lay.block)
    llsa_q_kernel[(lay.sizes[1], bh)](
        q, k, v, pkv, pkv.stride(0), sel, meta, o, do, lse, delta, out, part, plse, n, lay.n_pool, lay.n_sel,
        lay.n_seg, lay.levels, qk_scale, BM=lay.block, BT=16, FINE=True, SHARED=False, MERGE=lay.shared, SWAP=True,
        KPI=kpi, EVEN=even(lay, qk_scale, lay.block, [(lay.widths[1], kpi)]), KW=kw,
        num_warps=t["fine_warps"], num_stages=t["fine_stages"], **common)


def forward_kernels(q, k, v, lay: Layout, meta: torch.Tensor, reweight: bool, scale: float, out):
    """Writes ``out``: o (..., N, D) like the contiguous q, k, v, lse (..., N) float32, pooled k/v
    (2, BH, n_pool, D), picks (BH, n_sel) int32, where BH is the product of the leading dims.

    Each tensor is passed whole (no views): on a slow host each view costs ~5 us, and a forward made 14."""
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    o, lse, pkv, sel = out
    poison(o, lse, pkv)
    t = tune(d)
    select_tuned(pool_tuned(q, k, v, lay, t, kv_out=pkv), lay, t, out=sel)
    part = plse = None
    if not fused(lay, t, "fwd_"):
        part = torch.empty(bh, n, d, dtype=torch.float32, device=q.device)
        plse = torch.empty(bh, n, dtype=torch.float32, device=q.device)
    launch_query_pass(QueryPass(lay, meta, q, k, v, pkv, sel, lse, o, scale * LOG2E, reweight, part=part, plse=plse),
                      t)


def backward_kernels(do, q, k, v, o, lse, pkv, sel, lay: Layout, meta: torch.Tensor, reweight: bool,
                     scale: float, deterministic: bool, out):
    """Writes ``out``: dq, dk, dv (..., N, D) like the contiguous inputs (passed whole, as in the forward)."""
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    dq, dk, dv = out
    poison(dq, dk, dv)
    prec = precision(q.dtype)
    qk_scale = scale * LOG2E
    t = tune(d)
    delta = torch.empty(bh, n, dtype=torch.float32, device=q.device)
    dq_shared = None
    if fused(lay, t, "dq_"):
        # the fused dq pass makes delta
        poison(delta)
    else:
        delta_kernel[(triton.cdiv(bh * n, 64),)](o, do, delta, bh * n, D=d, BR=64)
        dq_shared = torch.empty(bh, n, d, dtype=torch.float32, device=q.device)
    launch_query_pass(QueryPass(lay, meta, q, k, v, pkv, sel, lse, dq, qk_scale, reweight, bwd=True, o=o, do=do,
                                delta=delta, part=dq_shared, plse=lse), t)
    dpk = torch.zeros(bh, lay.n_pool, d, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    if lay.n_seg > 1:
        # partial rows of the largest enriched level: one per (ancestor, pick, child)
        n_part = max(lay.sizes[lv + 1] * lay.widths[lv + 1] * lay.block for lv in range(1, lay.n_seg))
        part_k = torch.empty(bh, n_part, d, dtype=torch.float32, device=q.device)
        part_v = torch.empty_like(part_k)
    for lv in range(1, lay.n_seg):
        kpi = max(1, t["cand_keys"] // lay.block)
        n_tiles = triton.cdiv(lay.widths[lv + 1], kpi)
        llsa_cand_kv_kernel[(lay.sizes[lv + 1] * n_tiles, bh)](
            q, pkv[0], pkv[1], do, lse, delta, meta, sel, part_k, part_v, n, lay.n_pool, lay.n_sel, n_part, lv,
            n_tiles, qk_scale, B=lay.block, D=d, KPI=kpi, BMQ=t["cand_rows"], REWEIGHT=reweight, PREC=prec,
            num_warps=t["cand_warps"])
        rowptr, idx = transpose_picks(sel, lay.sizes[lv + 1], lay.widths[lv + 1], lay.sel_off[lv + 1],
                                      deterministic)
        llsa_cand_reduce_kernel[(lay.sizes[lv + 1], bh)](part_k, part_v, meta, rowptr, idx, dpk, dpv, lay.n_pool,
                                                         n_part, lv, B=lay.block, D=d)
    if lay.top:
        n_top, off = lay.sizes[lay.levels], lay.pool_off[lay.levels]
        bk = min(t["top_keys"], max(16, triton.next_power_of_2(n_top)))
        n_chunks = top_chunks(n, triton.cdiv(n_top, bk) * bh, t["top_programs"])
        chunk = triton.cdiv(n, n_chunks)
        part = torch.empty(2, n_chunks, bh, n_top, d, dtype=torch.float32, device=q.device)
        llsa_top_kv_kernel[(triton.cdiv(n_top, bk), n_chunks, bh)](
            q, pkv[0], pkv[1], do, lse, delta, meta, part[0], part[1], n, lay.n_pool, lay.levels, chunk,
            qk_scale, BK=bk, D=d, BMQ=64, REWEIGHT=reweight, PREC=prec, num_warps=t["top_warps"])
        dpk[:, off:off + n_top] += part[0].sum(0)
        dpv[:, off:off + n_top] += part[1].sum(0)
    rowptr, idx = transpose_picks(sel, lay.sizes[1], lay.widths[1], lay.sel_off[1], deterministic)
    llsa_kv_kernel[(lay.sizes[1], bh)](q, k, v, do, lse, delta, meta, rowptr, idx, dk, dv, dpk, dpv, n,
                                       lay.n_pool, lay.levels, qk_scale, B=lay.block, D=d, BMQ=t["kv_rows"],
                                       POOLED=lay.shared, REWEIGHT=reweight, PREC=prec,
                                       num_warps=t["kv_warps"], num_stages=t["kv_stages"])
