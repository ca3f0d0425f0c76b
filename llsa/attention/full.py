"""Dense attention through ``F.scaled_dot_product_attention`` (FlashAttention on the GPU)."""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from llsa.attention.registry import register


@dataclass
class FullOptions:
    scale: float | None = None


@register("full", FullOptions)
class FullAttention(nn.Module):
    def __init__(self, dim: int, heads: int, opts: FullOptions):
        super().__init__()
        self.opts = opts

    def forward(self, q, k, v, x=None):
        return F.scaled_dot_product_attention(q, k, v, scale=self.opts.scale)
