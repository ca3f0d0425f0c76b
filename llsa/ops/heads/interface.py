"""Launchers and the torch custom ops behind ``split_heads`` / ``merge_heads`` with ``backend="triton"``.

Custom ops with fake implementations, so ``torch.compile`` keeps them whole: inductor's own fusion of the
same norm, rotation and transposes ran at a quarter of the memory rate on an H100 (docs/benchmarks.md).
"""
import torch
import triton

from llsa.ops.heads.kernels import merge_kernel, split_bwd_kernel, split_fwd_kernel
from llsa.ops.poison import poison

# tokens per program: 64 rows of D <= 128 keep a program's tiles small and the grid in the thousands
BLOCK_T = 64


def _grid(b, h, n):
    return (triton.cdiv(n, BLOCK_T), b * h)


@torch.library.custom_op("llsa::split_heads", mutates_args=())
def _split(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
           k_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = (qkv.new_empty(b, heads, n, d) for _ in range(3))
    poison(q, k, v)
    split_fwd_kernel[_grid(b, heads, n)](qkv, cos, sin, q_weight, k_weight, q, k, v, n, heads, eps, D=d,
                                         BT=BLOCK_T, NORM=q_weight is not None)
    return q, k, v


@_split.register_fake
def _(qkv, heads, cos, sin, q_weight, k_weight, eps):
    b, n, width = qkv.shape
    return tuple(qkv.new_empty(b, heads, n, width // (3 * heads)) for _ in range(3))


@torch.library.custom_op("llsa::split_heads_bwd", mutates_args=())
def _split_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, dw): dw is [2, d] fp32 (the q and k norm weights' gradients), or empty without a norm."""
    b, heads, n, d = dq.shape
    dqkv = torch.empty_like(qkv)
    norm = q_weight is not None
    grid = _grid(b, heads, n)
    parts = torch.empty(2, grid[0] * grid[1], d if norm else 0, device=qkv.device, dtype=torch.float32)
    poison(dqkv, parts)
    split_bwd_kernel[grid](qkv, cos, sin, q_weight, k_weight, dq, dk, dv, dqkv, parts, n, heads, eps, D=d,
                           BT=BLOCK_T, NORM=norm)
    return dqkv, parts.sum(1)


@_split_bwd.register_fake
def _(dq, dk, dv, qkv, cos, sin, q_weight, k_weight, eps):
    d = dq.shape[-1] if q_weight is not None else 0
    return torch.empty_like(qkv), qkv.new_empty(2, d, dtype=torch.float32)


def _split_setup(ctx, inputs, output):
    qkv, heads, cos, sin, q_weight, k_weight, eps = inputs
    ctx.save_for_backward(qkv, cos, sin, q_weight, k_weight)
    ctx.eps = eps


def _split_backward(ctx, dq, dk, dv):
    qkv, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dqkv, dw = _split_bwd(dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv, cos, sin, q_weight, k_weight,
                          ctx.eps)
    dwq = dwk = None
    if q_weight is not None:
        dwq, dwk = dw[0].to(q_weight.dtype), dw[1].to(k_weight.dtype)
    return dqkv, None, None, None, dwq, dwk, None


_split.register_autograd(_split_backward, setup_context=_split_setup)


def _relayout(x: torch.Tensor, heads: int, to_tokens: bool) -> torch.Tensor:
    """[b, heads, n, d] -> [b, n, heads * d] (``to_tokens``), or back."""
    x = x.contiguous()
    if to_tokens:
        b, _, n, d = x.shape
        y = x.new_empty(b, n, heads * d)
    else:
        b, n, width = x.shape
        d = width // heads
        y = x.new_empty(b, heads, n, d)
    poison(y)
    merge_kernel[_grid(b, heads, n)](x, y, n, heads, D=d, BT=BLOCK_T, TO_TOKENS=to_tokens)
    return y


@torch.library.custom_op("llsa::merge_heads", mutates_args=())
def _merge(o: torch.Tensor) -> torch.Tensor:
    return _relayout(o, o.shape[1], True)


@_merge.register_fake
def _(o):
    b, h, n, d = o.shape
    return o.new_empty(b, n, h * d)


@torch.library.custom_op("llsa::merge_heads_bwd", mutates_args=())
def _merge_bwd(dy: torch.Tensor, heads: int) -> torch.Tensor:
    return _relayout(dy, heads, False)


@_merge_bwd.register_fake
def _(dy, heads):
    b, n, width = dy.shape
    return dy.new_empty(b, heads, n, width // heads)


def _merge_setup(ctx, inputs, output):
    ctx.heads = inputs[0].shape[1]


_merge.register_autograd(lambda ctx, dy: _merge_bwd(dy, ctx.heads), setup_context=_merge_setup)
