"""Test aid shared by every kernel op: with ``LLSA_POISON=1`` (tests/conftest.py sets it) each buffer a
kernel should fully overwrite starts as NaN (-1 for index buffers), so an element no kernel writes fails
a test instead of passing on whatever memory held."""
import os

import torch

ENABLED = os.environ.get("LLSA_POISON") == "1"


def poison(*tensors: torch.Tensor) -> None:
    if ENABLED:
        for t in tensors:
            t.fill_(float("nan") if t.is_floating_point() else -1)
