"""Plain-PyTorch head split (with QK RMSNorm and RoPE) and head merge: the CPU path and the kernels' oracle."""
import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(2i, 2i+1)`` of ``x`` (..., N, D) by the angles behind ``cos, sin`` (N, D/2), in fp32."""
    # [..., N, D] -> [..., N, D/2, 2]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def split_heads_torch(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    """``split_heads`` in PyTorch: fp32 norm and rotation, rounded once to qkv's dtype."""
    b, n, _ = qkv.shape
    # [b, n, 3 * heads * d] -> 3 x [b, heads, n, d]
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if q_weight is not None:
        q = F.rms_norm(q.float(), (q.shape[-1],), q_weight.float(), eps)
        k = F.rms_norm(k.float(), (k.shape[-1],), k_weight.float(), eps)
    q = apply_rope(q, cos, sin).to(qkv.dtype)
    k = apply_rope(k, cos, sin).to(qkv.dtype)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_heads_torch(o: torch.Tensor) -> torch.Tensor:
    """[b, heads, n, d] -> [b, n, heads * d]"""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)
