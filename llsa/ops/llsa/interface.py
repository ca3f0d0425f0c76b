"""Launchers, the autograd Function and the torch custom ops behind ``llsa_attention(backend="triton")``.

The forward and backward are ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile`` traces a model that calls LLSA without graph breaks.
"""
import os

import torch
import triton

from llsa.ops.llsa.bwd import llsa_kv_kernel, llsa_top_kv_kernel
from llsa.ops.llsa.fwd import LOG2E, llsa_q_kernel
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.pool import pool_qkv
from llsa.ops.llsa.select import select, unpack_sel
from llsa.ops.llsa.transpose import transpose_level

HEAD_DIMS = (16, 32, 64, 128)
# Queries per program in the coarsest level's dk/dv: enough programs to fill the GPU at large N.
TOP_CHUNK = 2048


def kernel_support(q: torch.Tensor, block_size: int) -> str | None:
    """Why the kernels cannot run these inputs (None when they can)."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim D={d} is not one of {HEAD_DIMS}; pad the head dim or use backend='torch'"
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        return (f"block_size={block_size} must be a power of two in 16..128 for the kernels "
                "(16-row matrix tiles); use backend='torch' for smaller blocks")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {q.device}; the kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported by the kernels; use float16, bfloat16 or float32"
    return None


def _flat(x: torch.Tensor) -> torch.Tensor:
    # [b, h, N, D] -> [b*h, N, D], contiguous
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _kpi(block: int) -> int:
    """Picks per key tile: 64-key tiles for 16- and 32-token blocks."""
    return max(1, 64 // block)


def forward_kernels(q, k, v, lay: Layout, reweight: bool, scale: float):
    """Returns o (BH, N, D), lse (BH, N) float32, pooled k/v (2, BH, n_pool, D), picks (BH, n_sel) int32."""
    bh, n, d = q.shape
    pooled = pool_qkv(q, k, v, lay)
    sel = select(pooled, lay)
    pkv = pooled[1:].to(q.dtype)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((bh, n), float("nan"), dtype=torch.float32, device=q.device)
    grid = (lay.sizes[1], bh)
    llsa_q_kernel[grid](q, k, v, pkv[0], pkv[1], sel, lay.meta(q.device), q, lse, lse, o, n, lay.n_pool, lay.n_sel,
                        lay.n_seg, lay.levels, scale * LOG2E, B=lay.block, D=d, KPI=_kpi(lay.block), TOP=lay.top,
                        REWEIGHT=reweight, BWD=False, PREC=_prec(q.dtype))
    return o, lse, pkv, sel


def backward_kernels(do, q, k, v, o, lse, pkv, sel, lay: Layout, reweight: bool, scale: float,
                     deterministic: bool):
    bh, n, d = q.shape
    meta = lay.meta(q.device)
    prec = _prec(q.dtype)
    qk_scale = scale * LOG2E
    delta = (do.float() * o.float()).sum(-1)
    dq = torch.full_like(q, float("nan"))
    llsa_q_kernel[(lay.sizes[1], bh)](q, k, v, pkv[0], pkv[1], sel, meta, do, lse, delta, dq, n, lay.n_pool,
                                      lay.n_sel, lay.n_seg, lay.levels, qk_scale, B=lay.block, D=d,
                                      KPI=_kpi(lay.block), TOP=lay.top, REWEIGHT=reweight, BWD=True, PREC=prec)
    dpk = torch.zeros(bh, lay.n_pool, d, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    for lv in range(1, lay.n_seg):
        rowptr, idx = transpose_level(sel, lay.sel_off[lv + 1], lay.sizes[lv + 1], lay.widths[lv + 1],
                                      deterministic)
        llsa_kv_kernel[(lay.sizes[lv + 1], bh)](q, k, v, pkv[0], pkv[1], do, lse, delta, meta, rowptr, idx, dq,
                                                dq, dpk, dpv, n, lay.n_pool, lv, lay.levels, qk_scale,
                                                B=lay.block, D=d, BMQ=64, FINE=False, POOLED=False,
                                                REWEIGHT=reweight, PREC=prec)
    if lay.top:
        n_top, off = lay.sizes[lay.levels], lay.pool_off[lay.levels]
        bk = min(64, max(16, triton.next_power_of_2(n_top)))
        n_chunks = triton.cdiv(n, TOP_CHUNK)
        part = torch.empty(2, n_chunks, bh, n_top, d, dtype=torch.float32, device=q.device)
        llsa_top_kv_kernel[(triton.cdiv(n_top, bk), n_chunks, bh)](
            q, pkv[0], pkv[1], do, lse, delta, meta, part[0], part[1], n, lay.n_pool, lay.levels, TOP_CHUNK,
            qk_scale, BK=bk, D=d, BMQ=64, REWEIGHT=reweight, PREC=prec)
        dpk[:, off:off + n_top] += part[0].sum(0)
        dpv[:, off:off + n_top] += part[1].sum(0)
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    rowptr, idx = transpose_level(sel, lay.sel_off[1], lay.sizes[1], lay.widths[1], deterministic)
    llsa_kv_kernel[(lay.sizes[1], bh)](q, k, v, pkv[0], pkv[1], do, lse, delta, meta, rowptr, idx, dk, dv, dpk,
                                       dpv, n, lay.n_pool, 0, lay.levels, qk_scale, B=lay.block, D=d,
                                       BMQ=lay.block, FINE=True, POOLED=lay.n_seg > 1 or lay.top,
                                       REWEIGHT=reweight, PREC=prec)
    return dq, dk, dv


@torch.library.custom_op("llsa::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int, levels: int,
                   enrich_levels: int, reweight: bool, scale: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lay = Layout(q.shape[-2], block_size, topk, levels, enrich_levels)
    o, lse, pkv, sel = forward_kernels(_flat(q), _flat(k), _flat(v), lay, reweight, scale)
    return o.view(q.shape), lse.view(q.shape[:-1]), pkv, sel


@_attention_fwd.register_fake
def _(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, deterministic):
    lay = Layout(q.shape[-2], block_size, topk, levels, enrich_levels)
    bh = q.shape[0] * q.shape[1]
    return (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(2, bh, lay.n_pool, q.shape[-1]), q.new_empty(bh, lay.n_sel, dtype=torch.int32))


@torch.library.custom_op("llsa::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, pkv: torch.Tensor, sel: torch.Tensor, block_size: int, topk: int,
                   levels: int, enrich_levels: int, reweight: bool, scale: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lay = Layout(q.shape[-2], block_size, topk, levels, enrich_levels)
    n, d = q.shape[-2], q.shape[-1]
    dq, dk, dv = backward_kernels(_flat(do), _flat(q), _flat(k), _flat(v), _flat(o), lse.reshape(-1, n),
                                  pkv, sel, lay, reweight, scale, deterministic)
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, pkv, sel, block_size, topk, levels, enrich_levels, reweight, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    o, lse, pkv, sel = output
    ctx.save_for_backward(q, k, v, o, lse, pkv, sel)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(lse, pkv, sel)


def _backward(ctx, do, _dlse, _dpkv, _dsel):
    q, k, v, o, lse, pkv, sel = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do.contiguous(), q, k, v, o, lse, pkv, sel, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def llsa_attention_triton(q, k, v, *, block_size, topk, levels, enrich_levels, reweight, scale,
                          deterministic=False, return_lse=False):
    """The kernel path of ``llsa_attention`` (arguments already validated)."""
    why = kernel_support(q, block_size)
    if why is not None:
        raise ValueError(f"llsa backend='triton': {why}")
    o, lse, _, _ = _attention_fwd(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale,
                                  deterministic)
    return (o, lse) if return_lse else o


def hierarchical_topk_triton(q, k, *, block_size, topk, levels):
    """The kernels' picks in ``hierarchical_topk``'s format (for tests and plots)."""
    lay = Layout(q.shape[-2], block_size, topk, levels, levels)
    pooled = pool_qkv(_flat(q), _flat(k), _flat(k), lay)
    return unpack_sel(select(pooled, lay), lay, q.shape[:2])
