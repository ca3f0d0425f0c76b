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


def check_qkv(name: str, q, k, v) -> None:
    for arg, t in {"q": q, "k": k, "v": v}.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: `{arg}` must have shape (batch, heads, N, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: `{arg}` must be floating point, got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: `{arg}` has shape {tuple(t.shape)} but `q` has {tuple(q.shape)}; "
                             "this is self-attention, so q, k and v must share (batch, heads, N, D)")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: `{arg}` is {t.dtype} but `q` is {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device} but `q` is on {q.device}; use one device")
    if q.shape[-2] == 0:
        raise ValueError(f"{name}: the sequence is empty (N = 0); pass at least one token")
