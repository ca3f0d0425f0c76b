"""Argument checks shared by every LLSA entry point: each error names the argument and the fix."""
import torch

from llsa.ops.llsa.levels import default_levels
from llsa.ops.validate import check_tensors


def check_qk(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, levels: int | None,
             v: torch.Tensor | None = None) -> int:
    """Validate inputs and selection parameters; return the resolved number of levels."""
    check_tensors("llsa", q=q, k=k, **({} if v is None else {"v": v}))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"llsa: `block_size` must be an integer >= 2, got {block_size!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"llsa: `topk` must be an integer >= 1, got {topk!r}")
    if levels is None:
        return default_levels(q.shape[-2], block_size)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"llsa: `levels` must be an integer >= 1 (or None for the default "
                         f"max(1, floor(log_B N) - 1)), got {levels!r}")
    return levels


def check_enrich(enrich_levels: int | None, levels: int) -> int:
    if enrich_levels is None:
        return levels
    if isinstance(enrich_levels, bool) or not isinstance(enrich_levels, int) or not 0 <= enrich_levels <= levels:
        raise ValueError(f"llsa: `enrich_levels` must be an integer in 0..levels = 0..{levels}, "
                         f"got {enrich_levels!r}")
    return enrich_levels
