"""The dense ceiling kernels of ``benchmarks/dense_ceiling.py`` against plain softmax attention (on the CPU
under the Triton interpreter: float32 and float16; bf16 on a GPU)."""
import math

import pytest
import torch

from benchmarks.dense_ceiling import dense_attention
from llsa.testing import assert_flash_rule


def _reference(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("style", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", ["float32", "half"])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_dense_kernels_match_softmax_attention(device, style, dtype, scale):
    # float32 products are tf32 on a GPU, so there the second precision is bf16; the interpreter has no bf16
    dtype = {"float32": torch.float32 if device.type == "cpu" else torch.bfloat16, "half": torch.float16}[dtype]
    torch.manual_seed(1)
    q, k, v = (scale * torch.randn(1, 2, 64, 32, device=device, dtype=dtype) for _ in range(3))
    out = dense_attention(q, k, v, style, block_m=32, block_n=16, num_warps=4, num_stages=2)
    ref = _reference(q, k, v)
    # the same attention in plain PyTorch at the input dtype sets the tolerance
    low = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(32), -1).to(dtype) @ v
    assert_flash_rule(f"{style} {dtype} scale={scale}", out, ref, low)


def test_launcher_says_what_to_change(device):
    q = torch.randn(1, 1, 48, 32, device=device)
    with pytest.raises(ValueError, match="multiple of block_m"):
        dense_attention(q, q, q, block_m=32, block_n=16)
    with pytest.raises(ValueError, match="style"):
        dense_attention(q[:, :, :32], q[:, :, :32], q[:, :, :32], "gather", block_m=32, block_n=16)
