"""Launchers and autograd Functions around the block-sparse Triton kernels.

``idx`` is always the query-major selection ``(batch, heads, n_blocks, K)`` of key-block indices (each row
distinct, any order); the key-major lists for the backward come from ``transpose_blocks``, the shared
``llsa.ops.common.transpose`` applied to block picks.
"""
import math
import os

import torch

from llsa.ops.blocksparse.kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel
from llsa.ops.blocksparse.validate import kernel_support
from llsa.ops.common import LOG2E
from llsa.ops.common.transpose import transpose_picks
from llsa.ops.poison import poison



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_inputs(name: str, q: torch.Tensor, block_size: int) -> None:
    """What the kernels assume, each with the change that satisfies it (``validate.kernel_support``)."""
    why = kernel_support(q, block_size)
    if why is not None:
        raise ValueError(f"{name}: {why}")


def transpose_blocks(idx: torch.Tensor, n_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-major lists from query-major picks ``idx`` (batch, heads, n_q, K), n_q == n_key_blocks.

    Returns ``start`` (batch*heads, n_key_blocks + 1) int64 and ``klist`` (batch*heads, n_q * K) int32: the
    picks of key block j are ``klist[bh, start[bh, j]:start[bh, j + 1]]`` as flat positions
    ``query_block * K + slot``, in arbitrary order.
    """
    b, h, nq, k = idx.shape
    if nq != n_key_blocks:
        raise ValueError(f"transpose_blocks: self-attention picks need as many query blocks as key blocks, "
                         f"got {nq} and {n_key_blocks}")
    return transpose_picks(idx.reshape(b * h, nq * k), n_key_blocks, k)


def _dot_precision(dtype: torch.dtype, linear: bool) -> str:
    """float32 softmax operands must match the reference ("ieee"); the linear mode's float32 operands need
    float32-class accuracy, which 3xTF32 gives on tensor cores; 16-bit operands ignore the setting, so they
    keep the CUDA default. The interpreter computes in numpy either way."""
    if _interpreting() or (dtype == torch.float32 and not linear):
        return "ieee"
    return "tf32x3" if linear else "tf32"


def _launch_args(q: torch.Tensor, block_size: int, linear: bool) -> dict:
    """Blocks gathered per inner step ``G``: 64 rows per tile for 16-bit operands; float32 tiles are twice
    as wide in bytes, so they take 32 rows and one fewer pipeline stage to stay within shared memory at
    D=128."""
    wide = q.dtype == torch.float32
    rows, stages = (32, 2) if wide else (64, 3)
    return dict(BS=block_size, D=q.shape[-1], G=max(1, rows // block_size), LINEAR=linear,
                PREC=_dot_precision(q.dtype, linear), num_warps=4, num_stages=stages)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Kernel output buffer, poisoned under test (``llsa.ops.poison``), so a row a kernel skips cannot pass."""
    out = torch.empty(shape, dtype=dtype, device=device)
    poison(out)
    return out


def _forward(q, k, v, idx32, block_size, scale, linear, store_o32=False):
    """Softmax: ``(o, lse, o32 or None)``; linear: ``(num, den, None)``."""
    bh, n, d = q.shape
    nq = idx32.shape[1]
    # linear mode keeps num in float32: SLA subtracts it from float32 global sums
    o = _empty((bh, n, d), torch.float32 if linear else q.dtype, q.device)
    o32 = _empty((bh, n, d), torch.float32, q.device) if store_o32 else o
    # [b*h, N]: the base-2 log-sum-exp (softmax) or the row sums of q k^T (linear)
    side = _empty((bh, n), torch.float32, q.device)
    _fwd_kernel[(nq, bh)](q, k, v, o, o32, side, side, idx32, n, nq, idx32.shape[2], scale * LOG2E,
                          STORE_O32=store_o32, **_launch_args(q, block_size, linear))
    return o, side, (o32 if store_o32 else None)


def _backward(q, k, v, do, lse, delta, idx32, start, klist, block_size, scale, linear):
    bh, n, d = q.shape
    nq, n_sel = idx32.shape[1], idx32.shape[2]
    nk = start.shape[1] - 1
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    args = _launch_args(q, block_size, linear)
    _bwd_dq_kernel[(nq, bh)](q, k, v, do, lse, delta, dq, idx32, n, nq, n_sel, scale * LOG2E, scale, **args)
    _bwd_dkdv_kernel[(nk, bh)](q, k, v, do, lse, delta, dk, dv, start, klist, n, nq, nk, n_sel,
                               scale * LOG2E, scale, **args)
    return dq, dk, dv


def _flat(x: torch.Tensor) -> torch.Tensor:
    # [b, h, N, D] -> [b*h, N, D]
    return x.reshape(-1, *x.shape[2:]).contiguous()


def _prepare(idx, q, block_size, start, klist, need_lists):
    b, h, n, _ = q.shape
    nk = -(-n // block_size)
    idx32 = idx.reshape(b * h, *idx.shape[2:]).to(torch.int32).contiguous()
    if need_lists and start is None:
        start, klist = transpose_blocks(idx, nk)
    return idx32, start, klist


class BlockSparseAttention(torch.autograd.Function):
    """``o = softmax(q k^T * scale) v`` restricted to each query block's picked key blocks."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, scale, start=None, klist=None):
        need = any(ctx.needs_input_grad[:3])
        idx32, start, klist = _prepare(idx, q, block_size, start, klist, need)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        # a float32 copy of o is only needed when the input dtype rounds it
        store_o32 = need and q.dtype != torch.float32
        o, lse, o32 = _forward(qf, kf, vf, idx32, block_size, scale, linear=False, store_o32=store_o32)
        ctx.save_for_backward(qf, kf, vf, o if o32 is None else o32, lse, idx32, start, klist)
        ctx.shape, ctx.block_size, ctx.scale = q.shape, block_size, scale
        return o.view(q.shape)

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, o, lse, idx32, start, klist = ctx.saved_tensors
        do = _flat(do.to(qf.dtype))
        # [b*h, N]: rowsum(o * do), the softmax backward's per-row constant, from the float32 output
        delta = (o.float() * do.float()).sum(-1)
        dq, dk, dv = _backward(qf, kf, vf, do, lse, delta, idx32, start, klist, ctx.block_size, ctx.scale,
                               linear=False)
        shape = ctx.shape
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None, None


class BlockSparseLinear(torch.autograd.Function):
    """Unnormalised linear attention over the picked key blocks: ``num = a v``, ``den = rowsum(a)`` with
    ``a = q k^T``; both float32. SLA subtracts them from the global linear-attention sums, where any
    16-bit rounding of ``a``, ``num`` or their gradients would be amplified by the cancellation (and a
    large gradient of a nearly empty marginal row would overflow float16), so every operand is float32:
    pass float32 inputs to keep the gradients unrounded too."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, start=None, klist=None):
        need = any(ctx.needs_input_grad[:3])
        idx32, start, klist = _prepare(idx, q, block_size, start, klist, need)
        qf, kf, vf = (_flat(t).float() for t in (q, k, v))
        num, den, _ = _forward(qf, kf, vf, idx32, block_size, 1.0, linear=True)
        ctx.save_for_backward(qf, kf, vf, idx32, start, klist)
        ctx.shape, ctx.dtypes, ctx.block_size = q.shape, (q.dtype, k.dtype, v.dtype), block_size
        b, h, n, _ = q.shape
        return num.view(q.shape), den.view(b, h, n)

    @staticmethod
    def backward(ctx, dnum, dden):
        qf, kf, vf, idx32, start, klist = ctx.saved_tensors
        shape = ctx.shape
        dnum = torch.zeros(shape, device=vf.device) if dnum is None else dnum
        dden = torch.zeros(shape[:3], device=vf.device) if dden is None else dden
        dnum = _flat(dnum.float())
        dden = dden.float().reshape(-1, shape[2]).contiguous()
        grads = _backward(qf, kf, vf, dnum, dden, dden, idx32, start, klist, ctx.block_size, 1.0, linear=True)
        dq, dk, dv = (g.view(shape).to(dt) for g, dt in zip(grads, ctx.dtypes))
        return dq, dk, dv, None, None, None, None


def block_sparse_attention_triton(q, k, v, idx, *, block_size, scale=None, lists=None):
    """Softmax attention of each query block over its picked key blocks (Triton, differentiable).

    ``q, k, v`` (batch, heads, N, D); ``idx`` (batch, heads, ceil(N/B), K) distinct key-block indices per
    row. ``lists``: optional ``transpose_blocks(idx, ...)`` result to share between calls.
    """
    check_kernel_inputs("block_sparse_attention", q, block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    start, klist = lists if lists is not None else (None, None)
    return BlockSparseAttention.apply(q, k, v, idx, block_size, float(scale), start, klist)


def block_sparse_linear_triton(q, k, v, idx, *, block_size, lists=None):
    """``(num, den)``: ``sum_t (q_i . k_t) v_t`` and ``sum_t q_i . k_t`` over the picked blocks' tokens."""
    check_kernel_inputs("block_sparse_linear", q, block_size)
    start, klist = lists if lists is not None else (None, None)
    return BlockSparseLinear.apply(q, k, v, idx, block_size, start, klist)
