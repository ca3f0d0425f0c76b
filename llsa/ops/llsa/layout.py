"""Where every level lives in the kernels' flat buffers, computed once per (N, B, K, L, E)."""
from dataclasses import dataclass
from functools import cached_property

import torch
import triton
import triton.language as tl

from llsa.ops.llsa.levels import level_sizes

# Spans B^l are capped here; any span >= N behaves the same (one token covers everything).
SPAN_CAP = 1 << 40

# Layout.meta: one int64 row of META_ROW per level, these columns (read in the kernels by level_field)
META_ROW: tl.constexpr = tl.constexpr(6)
SIZE: tl.constexpr = tl.constexpr(0)
WIDTH: tl.constexpr = tl.constexpr(1)
SEL_OFF: tl.constexpr = tl.constexpr(2)
POOL_OFF: tl.constexpr = tl.constexpr(3)
SPAN: tl.constexpr = tl.constexpr(4)


@triton.jit
def level_field(META, lv, FIELD: tl.constexpr):
    """Column ``FIELD`` (SIZE, WIDTH, SEL_OFF, POOL_OFF or SPAN) of level ``lv``'s row of ``Layout.meta``."""
    return tl.load(META + lv * META_ROW + FIELD)


@dataclass(frozen=True)
class Layout:
    """Sizes and offsets of levels ``0..L``.

    Pooled levels ``1..L`` are stacked along the token axis of one ``(BH, n_pool, D)`` buffer, level ``l``
    starting at row ``pool_off[l]``. Picks of levels ``1..L`` are stacked in one ``(BH, n_sel)`` int32 buffer,
    level ``l`` at ``sel_off[l]`` as ``sizes[l] x widths[l]`` row-major. Entry 0 of each tuple is unused
    (level 0 is the sequence itself).
    """

    n: int
    block: int
    topk: int
    levels: int
    enrich: int

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(level_sizes(self.n, self.block, self.levels))

    @cached_property
    def widths(self) -> tuple[int, ...]:
        return (0,) + tuple(min(self.topk, s) for s in self.sizes[1:])

    @cached_property
    def spans(self) -> tuple[int, ...]:
        return tuple(min(self.block ** level, SPAN_CAP) for level in range(self.levels + 1))

    @cached_property
    def pool_off(self) -> tuple[int, ...]:
        offs, acc = [0], 0
        for s in self.sizes[1:]:
            offs.append(acc)
            acc += s
        return tuple(offs)

    @property
    def n_pool(self) -> int:
        return sum(self.sizes[1:])

    @cached_property
    def sel_off(self) -> tuple[int, ...]:
        offs, acc = [0], 0
        for s, w in zip(self.sizes[1:], self.widths[1:]):
            offs.append(acc)
            acc += s * w
        return tuple(offs)

    @property
    def n_sel(self) -> int:
        return sum(s * w for s, w in zip(self.sizes[1:], self.widths[1:]))

    @property
    def n_seg(self) -> int:
        """Candidate segments: the fine tokens (segment 0) plus enriched levels ``1..min(E, L-1)``."""
        return min(self.enrich, self.levels - 1) + 1

    @property
    def shared(self) -> bool:
        """Whether queries also see keys shared by a whole tile (enriched candidates or the coarsest level)."""
        return self.n_seg > 1 or self.top

    @property
    def top(self) -> bool:
        """Whether every query also sees every coarsest token."""
        return self.enrich == self.levels

    def meta(self, device) -> torch.Tensor:
        """Per-level table read by the kernels: row ``lv`` holds, at the columns named above,
        ``[n_l, K_l, sel_off_l, pool_off_l, span_l, 0]``."""
        rows = [[self.sizes[lv], self.widths[lv], self.sel_off[lv], self.pool_off[lv], self.spans[lv], 0]
                for lv in range(self.levels + 1)]
        assert len(rows[0]) == META_ROW.value
        return torch.tensor(rows, dtype=torch.int64, device=device)

