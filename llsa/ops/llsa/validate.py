"""Argument checks shared by every LLSA entry point: each error names the argument and the fix."""
import torch

from llsa.ops.llsa.naive import default_levels


def check_qk(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, levels: int | None,
             v: torch.Tensor | None = None) -> int:
    """Validate inputs and selection parameters; return the resolved number of levels."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"llsa: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"llsa: `{name}` must have shape (batch, heads, N, D) like "
                             f"scaled_dot_product_attention, got {t.dim()} dims {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"llsa: `{name}` must be floating point, got {t.dtype}")
    for name, t in named.items():
        if t.shape != q.shape:
            raise ValueError(f"llsa: `{name}` has shape {tuple(t.shape)} but `q` has {tuple(q.shape)}; "
                             "LLSA is self-attention, so q, k and v must share (batch, heads, N, D)")
        if t.dtype != q.dtype:
            raise TypeError(f"llsa: `{name}` is {t.dtype} but `q` is {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"llsa: `{name}` is on {t.device} but `q` is on {q.device}; move them to one device")
    if q.shape[-2] == 0:
        raise ValueError("llsa: the sequence is empty (N = 0); pass at least one token")
    if q.shape[-1] == 0:
        raise ValueError("llsa: the head dimension D is 0")
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
