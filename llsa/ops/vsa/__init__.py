"""VSA (Video Sparse Attention, arXiv 2505.13389): the public entry point and its backend dispatch."""
import math

import torch

from llsa.ops.blocksparse.validate import check_block_options, kernel_support
from llsa.ops.common import choose_backend
from llsa.ops.validate import check_tensors
from llsa.ops.vsa.naive import vsa_attention_torch


def vsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None, *,
                  block_size: int = 16, topk: int = 8, scale: float | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """VSA: ``o = o_fine + gate * o_coarse``.

    ``q, k, v`` (batch, heads, N, D). The coarse branch is dense attention among the block means of q, k,
    v (blocks of ``block_size`` consecutive tokens; a trailing partial block is the mean of its real
    tokens), broadcast to every token of the query block. Each query block keeps the ``topk`` key blocks
    with the highest coarse scores (ties to the smaller index; ``topk`` is clamped to the number of
    blocks); the fine branch is exact attention over their tokens. ``gate`` (batch, heads, N, D) weighs
    the coarse branch per token and channel; ``None`` adds it ungated. ``scale`` defaults to 1/sqrt(D).
    ``backend``: ``"torch"`` (any device and dtype), ``"triton"`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA where the kernels take the inputs, else the
    reference). Returns q's shape and dtype.
    """
    check_tensors("vsa", q=q, k=k, v=v)
    check_block_options("vsa", block_size, topk)
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"vsa: `gate` must have q's shape {tuple(q.shape)} (batch, heads, N, D), "
                         f"got {tuple(gate.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = dict(block_size=block_size, topk=topk, scale=float(scale))
    # the float32 parts (pooled scores, the coarse branch) must stay float32 under mixed precision
    with torch.autocast(q.device.type, enabled=False):
        if choose_backend("vsa", backend, q, lambda: kernel_support(q, block_size)) == "torch":
            return vsa_attention_torch(q, k, v, gate, **args)
        from llsa.ops.vsa.interface import vsa_attention_triton

        return vsa_attention_triton(q, k, v, gate, **args)


__all__ = ["vsa_attention"]
