"""The backend rule every op follows (``llsa.ops.common.choose_backend``)."""
from types import SimpleNamespace

import pytest
import torch

from llsa.ops.common import choose_backend


def _on(device: str):
    return SimpleNamespace(device=torch.device(device))


def test_auto_takes_the_kernels_on_cuda_only_where_they_support_the_inputs():
    supported, unsupported = (lambda: None), (lambda: "block_size=8 is too small")
    assert choose_backend("op", "auto", _on("cuda"), supported) == "triton"
    assert choose_backend("op", "auto", _on("cuda"), unsupported) == "torch"
    assert choose_backend("op", "auto", _on("cpu"), supported) == "torch"


def test_explicit_backends_are_taken_as_asked_and_unknown_ones_refused():
    never = lambda: pytest.fail("an explicit backend needs no support check")  # noqa: E731
    assert choose_backend("op", "triton", _on("cpu"), never) == "triton"
    assert choose_backend("op", "torch", _on("cuda"), never) == "torch"
    with pytest.raises(ValueError, match=r"op: `backend` must be one of \('auto', 'torch', 'triton'\)"):
        choose_backend("op", "cuda", _on("cpu"), never)
