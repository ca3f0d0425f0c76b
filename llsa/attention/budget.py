"""Matching the attended-key budget of the block-sparse baselines to LLSA's."""
from llsa.ops.llsa.levels import default_levels, keys_per_query


def matched_topk(n: int, *, block_size: int = 16, topk: int = 8, levels: int | None = None,
                 enrich_levels: int | None = None) -> int:
    """The K that gives VSA/SLA (K blocks of ``block_size`` tokens) as many keys per query as LLSA.

    LLSA's count is ``keys_per_query`` (fine + enriched + coarsest tokens; ``levels=None`` takes
    ``default_levels``, ``enrich_levels=None`` all levels); it is rounded to the nearest whole number of
    blocks (halves up), at least 1. At N = 128^2 (L=2) this is 320 keys -> K = 20; at N = 256^2 with L=2,
    512 keys -> K = 32, the paper's baseline settings.
    """
    if n < 1 or block_size < 2 or topk < 1:
        raise ValueError(f"matched_topk: need n >= 1, block_size >= 2, topk >= 1; got n={n}, "
                         f"block_size={block_size}, topk={topk}")
    if levels is None:
        levels = default_levels(n, block_size)
    if enrich_levels is None:
        enrich_levels = levels
    keys = keys_per_query(n, block_size, topk, levels, enrich_levels)
    return max(1, (2 * keys + block_size) // (2 * block_size))
