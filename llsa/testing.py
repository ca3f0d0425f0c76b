"""The accuracy rule for kernels in low precision, one copy for every test and for the benchmark's gate.

flash-attention's rule: against a float32 (or float64) reference, a kernel's largest error may be at most
twice the largest error that plain PyTorch makes on the same inputs in the same low precision, plus a
rounding floor of ``FLOOR_REL`` of the reference's largest magnitude (and ``FLOOR_ABS``, for outputs that
are exactly zero). A fixed absolute tolerance would be too loose for small outputs and too tight for large.
"""
import math

import torch

FLOOR_REL = 1e-3
FLOOR_ABS = 1e-6


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def flash_bound(ref: torch.Tensor, low: torch.Tensor) -> float:
    """The largest error the rule allows, given the reference ``ref`` and PyTorch's low-precision ``low``."""
    return 2 * max_error(low, ref) + FLOOR_REL * ref.abs().max().item() + FLOOR_ABS


def flash_rule_failure(name: str, got: torch.Tensor, ref: torch.Tensor, low: torch.Tensor) -> str | None:
    """None when ``got`` meets the rule, else one line that says by how much it misses (NaN misses)."""
    err, bound = max_error(got, ref), flash_bound(ref, low)
    if math.isfinite(err) and err <= bound:
        return None
    return (f"{name}: error {err:.3e} > bound {bound:.3e} (2 x PyTorch's low-precision error "
            f"{max_error(low, ref):.3e} + floor)")


def assert_flash_rule(name: str, got: torch.Tensor, ref: torch.Tensor, low: torch.Tensor) -> None:
    failure = flash_rule_failure(name, got, ref, low)
    assert failure is None, failure
