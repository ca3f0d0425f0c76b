"""SLA (Sparse-Linear Attention, arXiv 2509.24006): the public entry point and its backend dispatch."""
import math

import torch

from llsa.ops.blocksparse.validate import check_block_options, kernel_support
from llsa.ops.common import choose_backend
from llsa.ops.validate import check_tensors
from llsa.ops.sla.naive import EPS, FEATURE_MAPS, sla_attention_torch


def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor | None = None,
                  proj_bias: torch.Tensor | None = None, *, block_size: int = 16, topk: int = 8,
                  feature_map: str = "softmax", scale: float | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """SLA: ``o = o_sparse + P(o_linear)``.

    ``q, k, v`` (batch, heads, N, D). Blocks of ``block_size`` consecutive tokens (a trailing partial
    block pooled over its real tokens). Each query block ranks key blocks by pooled q . pooled centred k
    and keeps the ``topk`` best (ties to the smaller index, clamped to the number of blocks) as critical:
    exact softmax attention over their tokens (``o_sparse``, scale defaults to 1/sqrt(D)). All other key
    blocks are marginal: linear attention ``phi(q) H_m / (phi(q) . Z_m + 1e-6)`` over their tokens, with
    ``feature_map`` phi = ``"softmax"`` (over the head dim) or ``"elu"`` (elu + 1). ``P(x) = x W^T + b``
    with ``proj_weight`` (D, D) and ``proj_bias`` (D,) applied per head in float32 (``proj_weight=None``:
    identity). ``backend`` as in ``vsa_attention``. Returns q's shape and dtype.
    """
    check_tensors("sla", q=q, k=k, v=v)
    check_block_options("sla", block_size, topk)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"sla: `feature_map` must be one of {FEATURE_MAPS}, got {feature_map!r}")
    d = q.shape[-1]
    if proj_weight is not None and tuple(proj_weight.shape) != (d, d):
        raise ValueError(f"sla: `proj_weight` must be (D, D) = ({d}, {d}), got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (d,):
        raise ValueError(f"sla: `proj_bias` must be (D,) = ({d},), got {tuple(proj_bias.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    args = dict(block_size=block_size, topk=topk, feature_map=feature_map, scale=float(scale))
    # the linear branch cancels global against selected sums in float32: autocast must not round them
    with torch.autocast(q.device.type, enabled=False):
        if choose_backend("sla", backend, q, lambda: kernel_support(q, block_size)) == "torch":
            return sla_attention_torch(q, k, v, proj_weight, proj_bias, **args)
        from llsa.ops.sla.interface import sla_attention_triton

        return sla_attention_triton(q, k, v, proj_weight, proj_bias, **args)


__all__ = ["sla_attention", "EPS", "FEATURE_MAPS"]
