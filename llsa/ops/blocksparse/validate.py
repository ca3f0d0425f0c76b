"""Argument checks shared by the VSA and SLA entry points; each error names the argument and the fix."""
import os

import torch


def check_block_options(name: str, block_size, topk) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: `block_size` must be an integer >= 1, got {block_size!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{name}: `topk` must be an integer >= 1 (values above the number of blocks are "
                         f"clamped to all blocks), got {topk!r}")


def kernel_support(q: torch.Tensor, block_size: int) -> str | None:
    """Why the block-sparse kernels cannot run these inputs (None when they can)."""
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return (f"the Triton backend needs a power-of-two head dim in 16..256 (32, 64, 128 are the tested "
                f"ones), got D={d}; pad the heads or use backend='torch'")
    if block_size < 16 or block_size & (block_size - 1):
        return (f"the Triton backend needs `block_size` to be a power of two >= 16, got {block_size}; change "
                "`block_size` or use backend='torch'")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if q.device.type != "cuda" and not interpreting:
        return (f"backend='triton' needs a CUDA tensor (got {q.device}) or TRITON_INTERPRET=1 set before llsa "
                "is imported; use backend='torch' on the CPU")
    if q.dtype == torch.bfloat16 and interpreting:
        return "bfloat16 is broken in the Triton interpreter; use float32/float16 or backend='torch' on the CPU"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton backend takes float16, bfloat16 or float32, got {q.dtype}"
    return None
