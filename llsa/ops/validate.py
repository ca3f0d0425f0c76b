"""Tensor checks shared by every attention op: each error names the op, the argument and the fix."""
import os

import torch


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """``q`` (and ``k``, ``v``): 4-D floating tensors (batch, heads, N, D) of q's shape, dtype and device,
    with N > 0 and D > 0. These ops are self-attention, so the shapes must match exactly."""
    q = tensors["q"]
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: `{arg}` must have shape (batch, heads, N, D) like "
                             f"scaled_dot_product_attention, got {t.dim()} dims {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: `{arg}` must be floating point, got {t.dtype}")
    for arg, t in tensors.items():
        if t.shape != q.shape:
            raise ValueError(f"{op}: `{arg}` has shape {tuple(t.shape)} but `q` has {tuple(q.shape)}; "
                             "this is self-attention, so q, k and v must share (batch, heads, N, D)")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{arg}` is {t.dtype} but `q` is {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{op}: `{arg}` is on {t.device} but `q` is on {q.device}; move them to one device")
    if q.shape[-2] == 0:
        raise ValueError(f"{op}: the sequence is empty (N = 0); pass at least one token")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: the head dimension D is 0")


def kernel_device_support(x: torch.Tensor) -> str | None:
    """Why Triton kernels cannot run on ``x``'s device and dtype (None when they can)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {x.device}; the kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} is not supported by the kernels; use float16, bfloat16 or float32"
    return None
