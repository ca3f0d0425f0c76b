"""LLSA as a registry module: no parameters of its own, options checked at construction."""
from dataclasses import dataclass

from torch import nn

from llsa.attention.registry import register
from llsa.ops.common import check_backend
from llsa.ops.llsa import llsa_attention


@dataclass
class LLSAOptions:
    block_size: int = 16
    topk: int = 8
    levels: int | None = None
    enrich_levels: int | None = None
    reweight: bool = True
    scale: float | None = None
    backend: str = "auto"
    deterministic: bool = False

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"llsa: `block_size` must be >= 2, got {self.block_size}")
        if self.topk < 1:
            raise ValueError(f"llsa: `topk` must be >= 1, got {self.topk}")
        if self.levels is not None and self.levels < 1:
            raise ValueError(f"llsa: `levels` must be >= 1 or None, got {self.levels}")
        if self.enrich_levels is not None and self.enrich_levels < 0:
            raise ValueError(f"llsa: `enrich_levels` must be >= 0 or None, got {self.enrich_levels}")
        if self.levels is not None and self.enrich_levels is not None and self.enrich_levels > self.levels:
            raise ValueError(f"llsa: `enrich_levels`={self.enrich_levels} exceeds `levels`={self.levels}")
        check_backend("llsa", self.backend)


@register("llsa", LLSAOptions)
class LLSAAttention(nn.Module):
    def __init__(self, dim: int, heads: int, opts: LLSAOptions):
        super().__init__()
        self.opts = opts

    def forward(self, q, k, v, x=None):
        o = self.opts
        # The kernels read contiguous [b, h, n, d]; copied here, under torch.compile the copies fuse with the
        # ops that made q, k, v (inside the custom op each is a separate strided copy).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return llsa_attention(q, k, v, block_size=o.block_size, topk=o.topk, levels=o.levels,
                              enrich_levels=o.enrich_levels, reweight=o.reweight, scale=o.scale,
                              backend=o.backend, deterministic=o.deterministic)
