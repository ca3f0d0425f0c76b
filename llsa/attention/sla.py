"""SLA as a registry module: owns the zero-initialised float32 projection of the linear branch."""
from dataclasses import dataclass

import torch
from torch import nn

from llsa.attention.registry import register
from llsa.ops.blocksparse.validate import check_block_options
from llsa.ops.common import check_backend
from llsa.ops.sla import FEATURE_MAPS, sla_attention


@dataclass
class SLAOptions:
    block_size: int = 16
    topk: int = 8
    feature_map: str = "softmax"
    backend: str = "auto"

    def __post_init__(self):
        check_block_options("sla", self.block_size, self.topk)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"sla: `feature_map` must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        check_backend("sla", self.backend)


@register("sla", SLAOptions)
class SLAAttention(nn.Module):
    """``o = o_sparse + P(o_linear)`` with ``P = Linear(D, D)`` shared by the heads.

    P starts at zero (weight and bias), so an untrained layer is pure block-sparse attention. It is created
    in float32 and always applied in float32, like the linear branch it projects.
    """

    def __init__(self, dim: int, heads: int, opts: SLAOptions):
        super().__init__()
        self.opts = opts
        d = dim // heads
        self.proj = nn.Linear(d, d, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q, k, v, x=None):
        o = self.opts
        return sla_attention(q, k, v, self.proj.weight, self.proj.bias, block_size=o.block_size, topk=o.topk,
                             feature_map=o.feature_map, backend=o.backend)
