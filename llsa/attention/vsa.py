"""VSA as a registry module: owns the zero-initialised gate projection of the coarse branch."""
from dataclasses import dataclass

from torch import nn

from llsa.attention.registry import register
from llsa.ops.blocksparse.validate import check_block_options
from llsa.ops.common import check_backend
from llsa.ops.vsa import vsa_attention


@dataclass
class VSAOptions:
    block_size: int = 16
    topk: int = 8
    backend: str = "auto"

    def __post_init__(self):
        check_block_options("vsa", self.block_size, self.topk)
        check_backend("vsa", self.backend)


@register("vsa", VSAOptions)
class VSAAttention(nn.Module):
    """``o = o_fine + g(x) * o_coarse`` with ``g = Linear(dim, dim)`` of the layer input, split into heads.

    The gate starts at zero (weight and bias), so an untrained layer is pure block-sparse attention.
    """

    def __init__(self, dim: int, heads: int, opts: VSAOptions):
        super().__init__()
        self.opts = opts
        self.heads = heads
        self.gate = nn.Linear(dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, q, k, v, x=None):
        if x is None:
            raise ValueError("vsa: the layer input `x` (batch, N, dim) is required; VSA gates its coarse "
                             "branch with a projection of it: call module(q, k, v, x)")
        if x.dim() != 3 or x.shape[0] != q.shape[0] or x.shape[1] != q.shape[2]:
            raise ValueError(f"vsa: `x` must be (batch, N, dim) with batch={q.shape[0]}, N={q.shape[2]} as "
                             f"in q, got {tuple(x.shape)}")
        b, n, dim = x.shape
        g = self.gate(x.to(self.gate.weight.dtype))
        # [b, N, dim] -> [b, heads, N, D]
        g = g.view(b, n, self.heads, dim // self.heads).transpose(1, 2)
        o = self.opts
        return vsa_attention(q, k, v, g, block_size=o.block_size, topk=o.topk, backend=o.backend)
