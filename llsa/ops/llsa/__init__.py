"""Log-linear Sparse Attention: the public entry point and its backend dispatch."""
import torch

from llsa.ops.common import choose_backend
from llsa.ops.llsa.levels import default_scale, keys_per_query
from llsa.ops.llsa.naive import hierarchical_topk, llsa_attention_torch
from llsa.ops.llsa.validate import check_enrich, check_qk

def resolve_backend(backend: str, q: torch.Tensor, block_size: int) -> str:
    """The path of one call (``llsa.ops.common.choose_backend``'s rule)."""

    def why_not():
        from llsa.ops.llsa.launch import kernel_support

        return kernel_support(q, block_size)

    return choose_backend("llsa", backend, q, why_not)


def llsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 16,
                   topk: int = 8, levels: int | None = None, enrich_levels: int | None = None,
                   reweight: bool = True, scale: float | None = None, backend: str = "auto",
                   deterministic: bool = False) -> torch.Tensor:
    """Log-linear sparse attention, a drop-in for ``F.scaled_dot_product_attention(q, k, v)``.

    ``q, k, v``: (batch, heads, N, D), one dtype and device. Each query attends, in one softmax, to the
    tokens of the ``topk`` key blocks its block picked, to the candidate tokens of ``enrich_levels``
    coarser levels, and (when ``enrich_levels == levels``) to every coarsest token; coarse tokens are
    weighted by how many original tokens they cover when ``reweight``. ``levels=None`` takes
    ``max(1, floor(log_B N) - 1)``. ``backend``: ``"torch"`` (reference, any device and dtype),
    ``"triton"`` (the kernels, CUDA or ``TRITON_INTERPRET=1``) or ``"auto"`` (kernels on CUDA).
    ``deterministic=True`` makes the kernels' gradients bitwise reproducible (ordered key-major lists).
    Returns a tensor of q's shape and dtype.
    """
    levels = check_qk(q, k, block_size=block_size, topk=topk, levels=levels, v=v)
    enrich_levels = check_enrich(enrich_levels, levels)
    if scale is None:
        scale = default_scale(q.shape[-1])
    args = dict(block_size=block_size, topk=topk, levels=levels, enrich_levels=enrich_levels,
                reweight=bool(reweight), scale=float(scale))
    if resolve_backend(backend, q, block_size) == "torch":
        return llsa_attention_torch(q, k, v, **args)
    from llsa.ops.llsa.interface import llsa_attention_triton

    return llsa_attention_triton(q, k, v, deterministic=deterministic, **args)


__all__ = ["llsa_attention", "hierarchical_topk", "keys_per_query"]
