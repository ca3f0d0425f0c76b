"""What the ops share: the backend rule every op follows, and constants. The kernels read the
``tl.constexpr`` copies of the constants (a jitted function may only read module globals that are
constexpr); launchers multiply scales by the plain floats."""
import math
from typing import Callable

import torch
import triton.language as tl

BACKENDS = ("auto", "torch", "triton")

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# base-2 exponentials: exp(x) = exp2(x * LOG2E), and a base-2 log-sum-exp times LN2 is a natural one
K_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
K_LN2: tl.constexpr = tl.constexpr(LN2)


def check_backend(op: str, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")


def choose_backend(op: str, backend: str, x: torch.Tensor, why_not: Callable[[], str | None]) -> str:
    """The path one call of ``op`` takes: ``"torch"`` (the plain-PyTorch reference) or ``"triton"``.

    ``auto``: the kernels on CUDA where they support these inputs (``why_not()`` is None), else the
    reference. ``triton`` is taken as asked; the op's launcher then says what its kernels cannot run.
    """
    check_backend(op, backend)
    if backend == "auto":
        return "triton" if x.device.type == "cuda" and why_not() is None else "torch"
    return backend
