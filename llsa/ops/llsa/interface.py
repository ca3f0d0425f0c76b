"""The autograd Function and the torch custom ops behind ``llsa_attention(backend="triton")``.

The forward and backward are ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile`` traces a model that calls LLSA without graph breaks; eager calls go through an autograd
Function that replays small problems from CUDA graphs (``graphs.py``). The kernel launches are in
``launch.py``.
"""
import torch

from llsa.ops.llsa import graphs
from llsa.ops.llsa.launch import (backward_kernels, contiguous, forward_kernels, kernel_support, layout,
                                  pool_tuned, select_tuned)
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.select import unpack_sel
from llsa.ops.llsa.tuning import tune


def _fwd_outputs_of(q, lay: Layout):
    """Fresh o, lse, pooled k/v and picks (contiguous whatever q's strides, as the kernels write them)."""
    bh = q.shape[0] * q.shape[1]
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(2, bh, lay.n_pool, q.shape[-1]), q.new_empty(bh, lay.n_sel, dtype=torch.int32))


def _fwd_outputs(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale):
    """Fresh outputs for ``_attention_fwd_impl`` to write."""
    return _fwd_outputs_of(q, layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)[0])


def _attention_fwd_impl(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale, out=None):
    lay, meta = layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)
    if out is None:
        out = _fwd_outputs(q, k, v, block_size, topk, levels, enrich_levels, reweight, scale)
    forward_kernels(contiguous(q), contiguous(k), contiguous(v), lay, meta, reweight, scale, out)
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
    lay, meta = layout(q.shape[-2], block_size, topk, levels, enrich_levels, q.device)
    if out is None:
        out = _bwd_outputs(do, q, k, v)
    do, q, k, v, o, lse = (contiguous(x) for x in (do, q, k, v, o, lse))
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
    pooled = pool_tuned(contiguous(q), contiguous(k), contiguous(k), lay, t)
    return unpack_sel(select_tuned(pooled, lay, t), lay, q.shape[:2])
