"""Test-wide setup. Without a GPU, Triton kernels run under the interpreter: the variable must be set
before any ``@triton.jit`` function is defined, i.e. before ``llsa`` is imported."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN under test, so an element no program writes cannot pass.
os.environ.setdefault("LLSA_POISON", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU if there is one, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
