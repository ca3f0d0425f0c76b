"""Moving a model's activations into and out of attention's head-major layout.

``split_heads`` takes a qkv projection's output [b, n, 3 * heads * d] to head-major q, k, v [b, heads, n, d],
with the QK RMSNorm (when weights are given) and RoPE applied to q and k on the way; ``merge_heads`` takes
the attention output [b, heads, n, d] back to [b, n, heads * d]. On CUDA each is one Triton kernel forward
and one backward; elsewhere (or with ``backend="torch"``) plain PyTorch.
"""
import torch

from llsa.ops.heads.naive import apply_rope, merge_heads_torch, split_heads_torch
from llsa.ops.common import choose_backend
from llsa.ops.validate import kernel_device_support


def kernel_support(x: torch.Tensor, d: int) -> str | None:
    """Why the kernels cannot run on ``x`` with head dim ``d`` (None when they can)."""
    if d < 2 or d > 256 or d & (d - 1):
        return f"head dim d={d} must be a power of two in 2..256 for the kernels"
    return kernel_device_support(x)


def _use_kernels(backend: str, x: torch.Tensor, d: int) -> bool:
    if choose_backend("heads", backend, x, lambda: kernel_support(x, d)) == "torch":
        return False
    why = kernel_support(x, d)
    if why is not None:
        raise ValueError(f"heads backend='triton': {why}")
    return True


def split_heads(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (b, heads, n, d), contiguous, from ``qkv`` (b, n, 3 * heads * d) laid out as [3, heads, d].

    q and k are RMS-normalised over d with ``q_weight`` / ``k_weight`` (d,) when given (both or neither),
    then rotated: pairs (2i, 2i+1) by the angles whose ``cos, sin`` are (n, d/2) rows. Computed in fp32 and
    rounded once to qkv's dtype. ``backend``: ``"auto"`` (kernels on CUDA), ``"torch"`` or ``"triton"``.
    """
    if qkv.dim() != 3 or heads < 1 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"split_heads: qkv must be (b, n, 3 * heads * d) with heads={heads}, "
                         f"got {tuple(qkv.shape)}")
    b, n, width = qkv.shape
    d = width // (3 * heads)
    if d % 2:
        raise ValueError(f"split_heads: RoPE turns pairs of channels, so the head dim must be even, got {d}")
    if tuple(cos.shape) != (n, d // 2) or cos.shape != sin.shape:
        raise ValueError(f"split_heads: cos and sin must be (n, d/2) = {(n, d // 2)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("split_heads: give both norm weights (q_weight, k_weight) or neither")
    if q_weight is not None and (q_weight.shape != (d,) or k_weight.shape != (d,)):
        raise ValueError(f"split_heads: norm weights must be ({d},), got {tuple(q_weight.shape)} and "
                         f"{tuple(k_weight.shape)}")
    if not _use_kernels(backend, qkv, d):
        return split_heads_torch(qkv, heads, cos, sin, q_weight, k_weight, eps)
    from llsa.ops.heads.interface import _split

    cos, sin = (t.to(device=qkv.device, dtype=torch.float32).contiguous() for t in (cos, sin))
    return _split(qkv.contiguous(), heads, cos, sin, q_weight, k_weight, float(eps))


def merge_heads(o: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(b, heads, n, d) -> (b, n, heads * d): the attention output back in token-major order."""
    if o.dim() != 4:
        raise ValueError(f"merge_heads: o must be (b, heads, n, d), got {tuple(o.shape)}")
    if not _use_kernels(backend, o, o.shape[-1]):
        return merge_heads_torch(o)
    from llsa.ops.heads.interface import _merge

    return _merge(o)


__all__ = ["split_heads", "merge_heads", "apply_rope"]
