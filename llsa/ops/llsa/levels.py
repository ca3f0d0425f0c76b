"""Level arithmetic of LLSA shared by the reference, the kernels' layout and the model side: how many levels,
how many tokens each holds, how many keys a query sees, and the tie rule of top-K selection."""
import math

import torch


def default_levels(n: int, block_size: int) -> int:
    """``max(1, floor(log_B N) - 1)``: the coarsest level then holds between B and B^2 tokens."""
    m, p = 0, block_size
    while p <= n:
        m, p = m + 1, p * block_size
    return max(1, m - 1)


def level_sizes(n: int, block_size: int, levels: int) -> list[int]:
    """Token counts of levels ``0..levels``: ``ceil(N / B^l)``."""
    sizes = [n]
    for _ in range(levels):
        sizes.append(-(-sizes[-1] // block_size))
    return sizes


def keys_per_query(n: int, block_size: int, topk: int, levels: int, enrich_levels: int) -> int:
    """Keys in one query's set (fine + enriched candidates + coarsest), as the spec's cost formula."""
    sizes = level_sizes(n, block_size, levels)
    total = min(topk, sizes[1]) * block_size
    for level in range(1, min(enrich_levels, levels - 1) + 1):
        total += min(topk, sizes[level + 1]) * block_size
    if enrich_levels == levels:
        total += sizes[levels]
    return total


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def top_smallest_ties(scores: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates of highest score, ties to the smaller index, returned in ascending index order.

    ``cand`` must be ascending along the last dim, so a stable descending sort keeps the smaller index
    first among equal scores.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(cand, -1, order).sort(dim=-1).values
