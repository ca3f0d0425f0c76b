"""Plain-PyTorch VSA (Video Sparse Attention): the CPU path and the oracle the kernels are tested against.

Both paths share the coarse branch and the selection defined here; they differ only in the fine branch.
"""
import torch

from llsa.ops.blocksparse.naive import block_broadcast, block_mean, block_sparse_attention_torch, topk_blocks


def vsa_coarse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, topk: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention among block means, and the top-K key blocks per query block by its scores.

    Returns ``o_coarse`` (b, h, n_blocks, D) in at least float32 (differentiable in q, k, v) and the
    selection (b, h, n_blocks, min(topk, n_blocks)) int64, ascending.
    """
    pq, pk, pv = (block_mean(t, block_size) for t in (q, k, v))
    # [b, h, nb, nb]: pre-softmax coarse scores; the softmax is monotone, so they also rank key blocks
    s = (pq @ pk.transpose(-1, -2)) * scale
    sel = topk_blocks(s.detach(), topk)
    return torch.softmax(s, dim=-1) @ pv, sel


def vsa_combine(o_fine: torch.Tensor, o_coarse: torch.Tensor, gate: torch.Tensor | None,
                block_size: int) -> torch.Tensor:
    """``o_fine + gate * o_coarse`` with the coarse rows broadcast to their block's tokens; q's dtype."""
    n = o_fine.shape[-2]
    # [b, h, N, D]
    oc = block_broadcast(o_coarse, block_size, n)
    acc = oc.dtype
    out = o_fine.to(acc) + (oc if gate is None else gate.to(acc) * oc)
    return out.to(o_fine.dtype)


def vsa_attention_torch(q, k, v, gate, *, block_size: int, topk: int, scale: float) -> torch.Tensor:
    """Reference VSA forward (autograd gives the backward). Arguments are already validated."""
    o_coarse, sel = vsa_coarse(q, k, v, block_size=block_size, topk=topk, scale=scale)
    o_fine = block_sparse_attention_torch(q, k, v, sel, block_size=block_size, scale=scale)
    return vsa_combine(o_fine, o_coarse, gate, block_size)
