"""Argument checks shared by the VSA and SLA entry points; each error names the argument and the fix."""
import torch

BACKENDS = ("auto", "torch", "triton")


def check_block_options(name: str, block_size, topk) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: `block_size` must be an integer >= 1, got {block_size!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{name}: `topk` must be an integer >= 1 (values above the number of blocks are "
                         f"clamped to all blocks), got {topk!r}")


def check_backend(name: str, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{name}: `backend` must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(name: str, backend: str, device: torch.device) -> str:
    """``auto``: the Triton kernels on CUDA, the plain-PyTorch path elsewhere."""
    check_backend(name, backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend

