"""Plain-PyTorch SLA (Sparse-Linear Attention): the CPU path and the oracle the kernels are tested against.

The linear branch is computed here literally from per-block states ``h_j = phi(K_j)^T V_j`` and
``z_j = phi(K_j)^T 1``: the marginal sum of a query block is the global sum minus its selected blocks'
states. The Triton path reaches the same sums through a block-sparse kernel instead (see ``interface``).
"""
from functools import partial

import torch
import torch.nn.functional as F

from llsa.ops.blocksparse.naive import block_mean, block_sparse_attention_torch, num_blocks, query_blocks, topk_blocks

FEATURE_MAPS = ("softmax", "elu")
# added to the linear branch's denominator; it keeps 1/den finite when the marginal keys carry almost no weight
EPS = 1e-6


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The linear branch's dtype: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi, computed in at least float32 and returned in x's dtype (both paths feed the same rounded
    values to the global and the subtracted sums, so they cancel exactly up to summation order)."""
    xf = x.to(_acc(x.dtype))
    if kind == "softmax":
        return torch.softmax(xf, dim=-1).to(x.dtype)
    if kind == "elu":
        return (F.elu(xf) + 1.0).to(x.dtype)
    raise ValueError(f"sla: `feature_map` must be one of {FEATURE_MAPS}, got {kind!r}")


@torch.no_grad()
def sla_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int) -> torch.Tensor:
    """Critical key blocks per query block: top-K of pooled q . pooled centred k (no scale, no softmax).

    Centring k (subtracting its mean over the sequence) removes the component every key shares, which
    otherwise dominates the pooled scores. Returns (b, h, n_blocks, min(topk, n_blocks)) int64, ascending.
    """
    kf = k.to(_acc(k.dtype))
    kc = kf - kf.mean(dim=-2, keepdim=True)
    s = block_mean(q, block_size) @ block_mean(kc, block_size).transpose(-1, -2)
    return topk_blocks(s, topk)


def linear_states(phi_k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` (b, h, n_blocks, D, D) and ``z`` (b, h, n_blocks, D) in at least float32; padded slots add
    nothing (they are zero after the feature map)."""
    acc = _acc(phi_k.dtype)
    # [b, h, nb, B, D]
    pk = query_blocks(phi_k.to(acc), block_size)
    pv = query_blocks(v.to(acc), block_size)
    return pk.transpose(-1, -2) @ pv, pk.sum(-2)


def sla_linear_torch(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, *,
                     block_size: int) -> torch.Tensor:
    """``phi(q_i) (H - sum_sel h_j) / (phi(q_i) . (Z - sum_sel z_j) + EPS)``, (b, h, N, D), at least
    float32."""
    n, d = phi_q.shape[-2:]
    h, z = linear_states(phi_k, v, block_size)
    # query and key blocks coincide (self-attention), so the per-query-block sums take h's shape
    h_sel, z_sel = torch.zeros_like(h), torch.zeros_like(z)
    # one picked block per step keeps memory at n_blocks * D * D instead of n_blocks * K * D * D
    for t in range(sel.shape[-1]):
        j = sel[..., t]
        h_sel = h_sel + torch.gather(h, 2, j[..., None, None].expand(-1, -1, -1, d, d))
        z_sel = z_sel + torch.gather(z, 2, j[..., None].expand(-1, -1, -1, d))
    h_m = h.sum(2, keepdim=True) - h_sel
    z_m = z.sum(2, keepdim=True) - z_sel
    # [b, h, nb, B, D]
    pq = query_blocks(phi_q.to(h.dtype), block_size)
    num = pq @ h_m
    den = (pq * z_m[..., None, :]).sum(-1, keepdim=True)
    return (num / (marginal_den(den) + EPS)).flatten(2, 3)[:, :, :n]


def marginal_den(den: torch.Tensor) -> torch.Tensor:
    """The marginal denominator, clamped at 0.

    Both feature maps are positive, so the exact value is >= 0; a negative one is rounding noise of the
    subtraction (global minus selected), which without the clamp could cancel EPS and blow the row up.
    The subtraction stays ill-conditioned when the marginal keys carry almost none of a query's
    feature-map mass (few marginal tokens and a peaked phi): the row is then dominated by noise of
    order |v|, a property of the global-minus-selected formulation itself.
    """
    return den.clamp(min=0.0)


def sla_combine(o_sparse, o_linear, proj_weight, proj_bias):
    """``o_sparse + P(o_linear)`` with P applied per head in o_linear's dtype (at least float32); returns
    o_sparse's dtype. ``proj_weight=None`` adds the linear branch unprojected."""
    acc = o_linear.dtype
    if proj_weight is None:
        proj = o_linear
    else:
        bias = None if proj_bias is None else proj_bias.to(acc)
        proj = F.linear(o_linear, proj_weight.to(acc), bias)
    return (o_sparse.to(acc) + proj).to(o_sparse.dtype)


def sla_attention_torch(q, k, v, proj_weight, proj_bias, *, block_size: int, topk: int, feature_map: str,
                        scale: float) -> torch.Tensor:
    """Reference SLA forward (autograd gives the backward). Arguments are already validated."""
    sel = sla_select(q, k, block_size=block_size, topk=topk)
    o_sparse = block_sparse_attention_torch(q, k, v, sel, block_size=block_size, scale=scale)
    impl = partial(sla_linear_torch, block_size=block_size)
    o_linear = linear_branch(q, k, v, sel, block_size=block_size, kind=feature_map, impl=impl)
    return sla_combine(o_sparse, o_linear, proj_weight, proj_bias)


def linear_branch(q, k, v, sel, *, block_size, kind, impl):
    """The marginal-block linear attention in at least float32; exactly zero when every block is critical
    (the subtraction would otherwise leave rounding noise over a zero denominator)."""
    if sel.shape[-1] == num_blocks(q.shape[-2], block_size):
        return torch.zeros(q.shape, dtype=_acc(q.dtype), device=q.device)
    return impl(feature_map(q, kind), feature_map(k, kind), v, sel)
