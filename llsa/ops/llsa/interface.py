"""Launchers, the autograd Function and the torch custom ops behind ``llsa_attention(backend="triton")``.

The forward and backward are ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile`` traces a model that calls LLSA without graph breaks.
"""
import threading

import torch
import triton

from llsa.ops.llsa import graphs
from llsa.ops.llsa.bwd import (delta_kernel, llsa_cand_kv_kernel, llsa_cand_reduce_kernel, llsa_kv_kernel,
                               llsa_top_kv_kernel)
from llsa.ops.llsa.fwd import LOG2E, llsa_q_kernel
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.pool import pool_qkv
from llsa.ops.llsa.select import select, unpack_sel
from llsa.ops.llsa.transpose import transpose_level
from llsa.ops.poison import poison
from llsa.ops.validate import kernel_device_support

HEAD_DIMS = (16, 32, 64, 128)
# Launch shapes, measured on an H100 (docs/benchmarks.md); ablations/tune_llsa.py sweeps them. pool_*: input
# rows per pooling program, warps; select_*: warps per selection program below the coarsest level, channels
# per scoring product; fwd_* and dq_*: the fused query-owned pass of the forward and of dq (query rows, shared
# key tile in 16-key blocks, fine keys per step, coarsest-level keys per step, warps, stages, and a register
# cap per thread, so that more programs fit an SM, or None); hoist_picks: pick lists up to this long are
# loaded whole before the query-owned loops over them (``_pick_width``);
# ``*_fused=False`` runs the split passes instead, whose shapes are shared_* and fine_* (fine_keys: keys per
# tile of the fine segment); cand_*: the enriched candidates' dk/dv (keys per tile, query rows per step,
# warps); kv_*: the fine keys' dk/dv; top_*: the coarsest level's dk/dv (top_programs: how many programs to
# split the queries into chunks for; their partials are then summed).
TUNE = dict(pool_rows=256, pool_warps=2, select_warps=2, select_chunk=32,
            fwd_fused=True, fwd_rows=64, fwd_kpi=4, fwd_keys=16, fwd_top_keys=64, fwd_warps=4, fwd_stages=3,
            fwd_maxnreg=None,
            dq_fused=True, dq_rows=64, dq_kpi=2, dq_keys=16, dq_top_keys=32, dq_warps=4, dq_stages=3,
            dq_maxnreg=None, hoist_picks=32,
            shared_kpi=4, shared_warps=4, shared_stages=2, fine_keys=64, fine_warps=4, fine_stages=2,
            cand_keys=64, cand_rows=64, cand_warps=4, kv_rows=128, kv_warps=4, kv_stages=2, top_keys=64,
            top_warps=4, top_programs=512)
# Overrides of TUNE above head dim 64, measured at D=128 (``tune_llsa --dim 128``): tiles of the same row
# count hold twice the bytes there, so the fastest shapes differ (more pooling warps, selection on more warps
# with narrower products, 32-key shared steps in the fused forward, fewer rows in the split and dk/dv passes).
TUNE_WIDE = dict(pool_warps=4, select_warps=4, select_chunk=16, fwd_kpi=2, shared_kpi=2, fine_keys=32, kv_rows=64,
                 cand_rows=32)


# Below this many elements in one head's (N, D) slab the query-owned kernels address rows with int32 offsets
# (one wide multiply-add per address instead of 64-bit arithmetic); from there on with int64 ones.
INT32_SLAB = 1 << 31


def tune(d: int) -> dict:
    """The launch shapes for head dim ``d``."""
    return {**TUNE, **TUNE_WIDE} if d > 64 else TUNE


def kernel_support(q: torch.Tensor, block_size: int) -> str | None:
    """Why the kernels cannot run these inputs (None when they can)."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim D={d} is not one of {HEAD_DIMS}; pad the head dim or use backend='torch'"
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        return (f"block_size={block_size} must be a power of two in 16..128 for the kernels "
                "(16-row matrix tiles); use backend='torch' for smaller blocks")
    return kernel_device_support(q)


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    # the kernels index (..., N, D) tensors as (BH, N, D) rows; a contiguous one is passed as it is
    return x if x.is_contiguous() else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# (n, block, topk, levels, enrich, device) -> (Layout, its kernel table on the device); never evicted (only
# clear_layouts() frees them): a table freed while another stream's kernels or a captured graph still read it
# could be handed out again.
_layouts: dict = {}


def _layout(n: int, block: int, topk: int, levels: int, enrich: int, device: torch.device):
    key = (n, block, topk, levels, enrich, device)
    hit = _layouts.get(key)
    if hit is None:
        lay = Layout(n, block, topk, levels, enrich)
        hit = _layouts[key] = (lay, _kernel_table(lay, device))
    return hit


def clear_layouts() -> None:
    """Free the cached layout tables, and with them every captured CUDA graph, whose kernels read the tables
    at the addresses they had at capture (a graph replayed after its table was freed reads freed memory)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    graphs.clear()
    _layouts.clear()


def _kernel_table(lay: Layout, device: torch.device) -> torch.Tensor:
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


def _top_chunks(n: int, key_programs: int, programs: int) -> int:
    """Query chunks for the coarsest dk/dv: about ``programs`` programs, chunks of >= 256 queries."""
    return max(1, min(triton.cdiv(n, 256), triton.cdiv(programs, key_programs)))


def pool_tuned(q, k, v, lay: Layout, t: dict, kv_out: torch.Tensor | None = None) -> torch.Tensor:
    """``pool_qkv`` with the launch shapes ``t`` (``tune(d)``'s)."""
    return pool_qkv(q, k, v, lay, t["pool_rows"], t["pool_warps"], kv_out=kv_out)


def select_tuned(pooled: torch.Tensor, lay: Layout, t: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """``select`` with the launch shapes ``t`` (``tune(d)``'s)."""
    return select(pooled, lay, out=out, warps=t["select_warps"], chunk=t["select_chunk"])


def _shared_rows(block: int) -> int:
    """Queries per program for the shared segments: one tile stays under one level-2 ancestor."""
    return min(128, block * block)


def _top_keys(lay: Layout, keys: int) -> int:
    """Keys per step over the coarsest level: ``keys``, or fewer where the level has fewer tokens."""
    return max(16, min(keys, triton.next_power_of_2(lay.sizes[lay.levels])))


def _fused_shape(lay: Layout, t: dict, pre: str) -> dict:
    """Tile constexprs and launch options of the fused query-owned pass (``pre``: "fwd_" or "dq_")."""
    block = lay.block
    return dict(BM=max(block, min(t[pre + "rows"], _shared_rows(block))), KPI=max(1, t[pre + "kpi"] * 16 // block),
                FKPI=max(1, t[pre + "keys"] // block), BT=_top_keys(lay, t[pre + "top_keys"]),
                KW=_pick_width(lay, t),
                num_warps=t[pre + "warps"], num_stages=t[pre + "stages"], maxnreg=t[pre + "maxnreg"])


def _pick_width(lay: Layout, t: dict) -> int:
    """The query-owned kernel's ``KW``: each loop over picks loads them all before it starts (a power of two
    >= the widest list) where the lists are at most ``hoist_picks`` long, else 0 (one load per step)."""
    width = triton.next_power_of_2(max(lay.widths[1:]))
    return width if width <= t["hoist_picks"] else 0


def _even(lay: Layout, qk_scale: float, rows: int, steps: list[tuple[int, int]]) -> bool:
    """Whether a query-owned launch may take the kernel's ``EVEN`` path (unmasked key loops, one weight per
    tile): N a multiple of B^L, so every token of every level covers its whole span and every candidate
    exists, and of the ``rows`` queries per program; each loop's ``(count, step)`` dividing evenly; and a
    positive scale, because that path takes a tile's largest logit from its largest raw score."""
    return (qk_scale > 0 and lay.n % lay.spans[lay.levels] == 0 and lay.n % rows == 0
            and all(count % step == 0 for count, step in steps))


def _shared_steps(lay: Layout, kpi: int, bt: int) -> list[tuple[int, int]]:
    """(count, step) of the shared loops: each enriched level's picks in ``kpi`` blocks, the coarsest level in
    ``bt`` tokens."""
    steps = [(lay.widths[lv + 1], kpi) for lv in range(1, lay.n_seg)]
    return steps + [(lay.sizes[lay.levels], bt)] if lay.top else steps


def _fused_steps(lay: Layout, shape: dict) -> list[tuple[int, int]]:
    """(count, step) of every loop of the fused pass with tile constexprs ``shape`` (``_fused_shape``'s): the
    shared loops, then the fine segment's picks in ``FKPI`` blocks."""
    return _shared_steps(lay, shape["KPI"], shape["BT"]) + [(lay.widths[1], shape["FKPI"])]


def _fused(lay: Layout, t: dict, pre: str) -> bool:
    """Whether the forward (``pre="fwd_"``) or dq (``"dq_"``) runs the fused query-owned pass with the shapes
    ``t`` (it needs shared segments to fuse with)."""
    return lay.shared and t[pre + "fused"]


def _launch_q(lay, t, meta, q, k, v, pkv, sel, o, do, lse, delta, out, part, plse, qk_scale, reweight, bwd):
    """The query-owned pass (forward, or dq with ``bwd``) with the caller's launch shapes ``t``: one fused pass
    over query tiles (shared segments, then each query block's fine segment; fused dq also makes delta), or
    with ``fwd_fused`` / ``dq_fused`` off or no shared segments, split: shared segments in 128-query tiles,
    then the fine segment of each block, merged."""
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    common = dict(D=d, B=lay.block, TOP=lay.top, REWEIGHT=reweight, BWD=bwd, PREC=_prec(q.dtype),
                  WIDE=n * d >= INT32_SLAB)
    pre = "dq_" if bwd else "fwd_"
    if _fused(lay, t, pre):
        shape = _fused_shape(lay, t, pre)
        llsa_q_kernel[(triton.cdiv(n, shape["BM"]), bh)](
            q, k, v, pkv, pkv.stride(0), sel, meta, o, do, lse, delta, out, part, plse, n, lay.n_pool, lay.n_sel,
            lay.n_seg, lay.levels, qk_scale, FINE=False, SHARED=True, MERGE=False, SWAP=False, FUSED=True,
            MAKE_DELTA=bwd, EVEN=_even(lay, qk_scale, shape["BM"], _fused_steps(lay, shape)), **shape, **common)
        return
    kw = _pick_width(lay, t)
    if lay.shared:
        bm = _shared_rows(lay.block)
        kpi = max(1, t["shared_kpi"] * 16 // lay.block)
        bt = _top_keys(lay, kpi * lay.block)
        llsa_q_kernel[(triton.cdiv(n, bm), bh)](
            q, k, v, pkv, pkv.stride(0), sel, meta, o, do, plse if not bwd else lse, delta, part, part, plse, n,
            lay.n_pool, lay.n_sel, lay.n_seg, lay.levels, qk_scale, BM=bm, FINE=False, SHARED=True,
            MERGE=False, SWAP=False, KPI=kpi, BT=bt, EVEN=_even(lay, qk_scale, bm, _shared_steps(lay, kpi, bt)),
            KW=kw, num_warps=t["shared_warps"], num_stages=t["shared_stages"], **common)
    kpi = max(1, t["fine_keys"] // lay.block)
    llsa_q_kernel[(lay.sizes[1], bh)](
        q, k, v, pkv, pkv.stride(0), sel, meta, o, do, lse, delta, out, part, plse, n, lay.n_pool, lay.n_sel,
        lay.n_seg, lay.levels, qk_scale, BM=lay.block, BT=16, FINE=True, SHARED=False, MERGE=lay.shared, SWAP=True,
        KPI=kpi, EVEN=_even(lay, qk_scale, lay.block, [(lay.widths[1], kpi)]), KW=kw,
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
    if not _fused(lay, t, "fwd_"):
        part = torch.empty(bh, n, d, dtype=torch.float32, device=q.device)
        plse = torch.empty(bh, n, dtype=torch.float32, device=q.device)
    _launch_q(lay, t, meta, q, k, v, pkv, sel, q, q, lse, lse, o, part, plse, scale * LOG2E, reweight, bwd=False)


def backward_kernels(do, q, k, v, o, lse, pkv, sel, lay: Layout, meta: torch.Tensor, reweight: bool,
                     scale: float, deterministic: bool, out):
    """Writes ``out``: dq, dk, dv (..., N, D) like the contiguous inputs (passed whole, as in the forward)."""
    n, d = q.shape[-2:]
    bh = q.numel() // (n * d)
    dq, dk, dv = out
    poison(dq, dk, dv)
    prec = _prec(q.dtype)
    qk_scale = scale * LOG2E
    t = tune(d)
    delta = torch.empty(bh, n, dtype=torch.float32, device=q.device)
    dq_shared = None
    if _fused(lay, t, "dq_"):
        # the fused dq pass makes delta
        poison(delta)
    else:
        delta_kernel[(triton.cdiv(bh * n, 64),)](o, do, delta, bh * n, D=d, BR=64)
        dq_shared = torch.empty(bh, n, d, dtype=torch.float32, device=q.device)
    _launch_q(lay, t, meta, q, k, v, pkv, sel, o, do, lse, delta, dq, dq_shared, lse, qk_scale, reweight, bwd=True)
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
        rowptr, idx = transpose_level(sel, lay.sel_off[lv + 1], lay.sizes[lv + 1], lay.widths[lv + 1],
                                      deterministic)
        llsa_cand_reduce_kernel[(lay.sizes[lv + 1], bh)](part_k, part_v, meta, rowptr, idx, dpk, dpv, lay.n_pool,
                                                         n_part, lv, B=lay.block, D=d)
    if lay.top:
        n_top, off = lay.sizes[lay.levels], lay.pool_off[lay.levels]
        bk = min(t["top_keys"], max(16, triton.next_power_of_2(n_top)))
        n_chunks = _top_chunks(n, triton.cdiv(n_top, bk) * bh, t["top_programs"])
        chunk = triton.cdiv(n, n_chunks)
        part = torch.empty(2, n_chunks, bh, n_top, d, dtype=torch.float32, device=q.device)
        llsa_top_kv_kernel[(triton.cdiv(n_top, bk), n_chunks, bh)](
            q, pkv[0], pkv[1], do, lse, delta, meta, part[0], part[1], n, lay.n_pool, lay.levels, chunk,
            qk_scale, BK=bk, D=d, BMQ=64, REWEIGHT=reweight, PREC=prec, num_warps=t["top_warps"])
        dpk[:, off:off + n_top] += part[0].sum(0)
        dpv[:, off:off + n_top] += part[1].sum(0)
    rowptr, idx = transpose_level(sel, lay.sel_off[1], lay.sizes[1], lay.widths[1], deterministic)
    llsa_kv_kernel[(lay.sizes[1], bh)](q, k, v, do, lse, delta, meta, rowptr, idx, dk, dv, dpk, dpv, n,
                                       lay.n_pool, lay.levels, qk_scale, B=lay.block, D=d, BMQ=t["kv_rows"],
                                       POOLED=lay.shared, REWEIGHT=reweight, PREC=prec,
                                       num_warps=t["kv_warps"], num_stages=t["kv_stages"])


def _fwd_outputs_of(q, lay: Layout):
    """Fresh o, lse, pooled k/v and picks (contiguous whatever q's strides, as the kernels write them)."""
    bh = q.shape[0] * q.shape[1]
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(2, bh, lay.n_pool, q.shape[-1]), q.new_empty(bh, lay.n_sel, dtype=torch.int32))


def _fwd_outputs(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale):
    """Fresh outputs for ``_attention_fwd_impl`` to write."""
    return _fwd_outputs_of(q, _layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)[0])


def _attention_fwd_impl(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, out=None):
    lay, meta = _layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)
    if out is None:
        out = _fwd_outputs(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale)
    forward_kernels(_contiguous(q), _contiguous(k), _contiguous(v), lay, meta, reweight, scale, out)
    return out


@torch.library.custom_op("llsa::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int, levels: int,
                   enrich_levels: int, reweight: bool, scale: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_fwd_impl(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale)


@_attention_fwd.register_fake
def _(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, deterministic):
    # no device table while tracing: the Layout alone gives the shapes
    return _fwd_outputs_of(q, Layout(q.shape[-2], block_size, topk, levels, enrich_levels))


def _bwd_outputs(do, q, k, v, *_):
    """Fresh dq, dk, dv for ``_attention_bwd_impl`` to write (contiguous, as the kernels write them)."""
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _attention_bwd_impl(do, q, k, v, o, lse, pkv, sel, block_size, topk, levels, enrich_levels, reweight,
                        scale, deterministic, out=None):
    lay, meta = _layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)
    if out is None:
        out = _bwd_outputs(do, q, k, v)
    do, q, k, v, o, lse = (_contiguous(x) for x in (do, q, k, v, o, lse))
    backward_kernels(do, q, k, v, o, lse, pkv, sel, lay, meta, reweight, scale, deterministic, out)
    return out


@torch.library.custom_op("llsa::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, pkv: torch.Tensor, sel: torch.Tensor, block_size: int, topk: int,
                   levels: int, enrich_levels: int, reweight: bool, scale: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_impl(do, q, k, v, o, lse, pkv, sel, block_size, topk, levels, enrich_levels, reweight,
                               scale, deterministic)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, pkv, sel, block_size, topk, levels, enrich_levels, reweight, scale, deterministic):
    return _bwd_outputs(do, q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    o, lse, pkv, sel = output
    ctx.save_for_backward(q, k, v, o, lse, pkv, sel)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(lse, pkv, sel)
    # only o is differentiable: no zero gradients need be made for the others
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _dlse, _dpkv, _dsel):
    q, k, v, o, lse, pkv, sel = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do.contiguous(), q, k, v, o, lse, pkv, sel, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _LLSAFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom ops without their dispatch cost per call, replayed
    from CUDA graphs when the problem is small enough for launching to dominate (``graphs.py``)."""

    @staticmethod
    def forward(ctx, q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, deterministic):
        args = (block_size, topk, levels, enrich_levels, reweight, scale)
        if graphs.usable(q):
            out = graphs.replay(_attention_fwd_impl, (q, k, v), args, _fwd_outputs)
        else:
            out = _attention_fwd_impl(q, k, v, *args)
        _setup_context(ctx, (q, k, v, *args, deterministic), out)
        return out

    @staticmethod
    def backward(ctx, do, _dlse, _dpkv, _dsel):
        saved = (do.contiguous(), *ctx.saved_tensors)
        if graphs.usable(do):
            dq, dk, dv = graphs.replay(_attention_bwd_impl, saved, ctx.args, _bwd_outputs)
        else:
            dq, dk, dv = _attention_bwd_impl(*saved, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def llsa_attention_triton(q, k, v, *, block_size, topk, levels, enrich_levels, reweight, scale,
                          deterministic=False, return_lse=False):
    """The kernel path of ``llsa_attention`` (arguments already validated)."""
    why = kernel_support(q, block_size)
    if why is not None:
        raise ValueError(f"llsa backend='triton': {why}")
    args = (q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, deterministic)
    if torch.compiler.is_compiling():
        o, lse, _, _ = _attention_fwd(*args)
    else:
        o, lse, _, _ = _LLSAFunction.apply(*args)
    return (o, lse) if return_lse else o


def hierarchical_topk_triton(q, k, *, block_size, topk, levels):
    """The kernels' picks in ``hierarchical_topk``'s format (for tests and plots), from the forward's launch
    shapes."""
    lay = Layout(q.shape[-2], block_size, topk, levels, levels)
    t = tune(q.shape[-1])
    pooled = pool_tuned(_contiguous(q), _contiguous(k), _contiguous(k), lay, t)
    return unpack_sel(select_tuned(pooled, lay, t), lay, q.shape[:2])
