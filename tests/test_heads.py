"""Head split (QK RMSNorm + RoPE) and merge: the kernels against a float64 evaluation of the same formulas.

Without a GPU the kernels run under the Triton interpreter (conftest); with one, also in bfloat16 and
under torch.compile. Low-precision results follow the flash rule: the kernel's error against float64 is at
most twice PyTorch's own error in that precision plus a rounding floor.
"""
import pytest
import torch

from llsa.ops.heads import merge_heads, split_heads
from llsa.testing import assert_flash_rule

HAS_CUDA = torch.cuda.is_available()


def _inputs(b, n, h, d, dtype, device, scale=1.0, norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, n, 3 * h * d, generator=g) * scale).to(device, dtype).requires_grad_()
    angles = torch.rand(n, d // 2, generator=g, dtype=torch.float64) * 20
    cos, sin = (t.float().to(device) for t in (angles.cos(), angles.sin()))
    weights = [(torch.rand(d, generator=g) + 0.5).to(device).requires_grad_() for _ in range(2)] if norm else []
    grads = [torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3)]
    return qkv, cos, sin, weights, grads


def _run(backend, qkv, h, cos, sin, weights, grads, dtype=None):
    """Outputs and gradients (qkv, then the norm weights) of one backend, inputs cast to ``dtype``."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in [qkv, *weights]]
    c, s = (t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in (cos, sin))
    out = split_heads(leaves[0], h, c, s, *leaves[1:], eps=1e-6, backend=backend)
    res = torch.autograd.grad(out, leaves, [g.to(out[0].dtype) for g in grads])
    return [t.double() for t in (*out, *res)]


CASES = [(1, 1, 1, 2), (2, 37, 3, 16), (1, 130, 2, 64), (1, 65, 1, 128)]


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-n{}-h{}-d{}".format(*c))
def test_split_kernel_matches_reference_fp32(case, norm, device):
    b, n, h, d = case
    args = _inputs(b, n, h, d, torch.float32, device, norm=norm, seed=n)
    qkv, cos, sin, weights, grads = args
    ref = _run("torch", qkv, h, cos, sin, weights, grads, torch.float64)
    got = _run("triton", qkv, h, cos, sin, weights, grads)
    names = ["q", "k", "v", "dqkv", "dwq", "dwk"]
    for name, r, g in zip(names, ref, got):
        assert not torch.isnan(g).any(), f"{name} has unwritten (NaN) elements"
        torch.testing.assert_close(g, r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=1e-5, msg=name)


LOW = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_split_kernel_flash_rule_low_precision(dtype, scale, device):
    b, n, h, d = 2, 100, 2, 64
    qkv, cos, sin, weights, grads = _inputs(b, n, h, d, dtype, device, scale=scale, seed=int(scale * 10))
    ref = _run("torch", qkv, h, cos, sin, weights, grads, torch.float64)
    torch_low = _run("torch", qkv, h, cos, sin, weights, grads)
    got = _run("triton", qkv, h, cos, sin, weights, grads)
    for name, r, t, g in zip(["q", "k", "v", "dqkv", "dwq", "dwk"], ref, torch_low, got):
        assert_flash_rule(f"{dtype} scale={scale} {name}", g, r, t)


def test_merge_is_the_transpose_and_back(device):
    o = torch.randn(2, 3, 77, 32, device=device, requires_grad=True)
    dy = torch.randn(2, 77, 96, device=device)
    y = merge_heads(o, backend="triton")
    assert torch.equal(y, o.detach().transpose(1, 2).reshape(2, 77, 96))
    (do,) = torch.autograd.grad(y, o, dy)
    assert torch.equal(do, dy.view(2, 77, 3, 32).transpose(1, 2))


def test_auto_uses_plain_pytorch_off_cuda():
    qkv, cos, sin, weights, grads = _inputs(1, 5, 1, 6, torch.float32, "cpu")
    # d=6 is not a power of two: fine for the PyTorch path, refused by the kernels
    q, k, v = split_heads(qkv, 1, cos, sin, *weights)
    assert q.shape == (1, 1, 5, 6) and q.is_contiguous()
    with pytest.raises(ValueError, match="power of two"):
        split_heads(qkv, 1, cos, sin, *weights, backend="triton")


@pytest.mark.parametrize("bad, match", [
    (dict(heads=5), "3 \\* heads \\* d"),
    (dict(cos=torch.zeros(7, 8)), "cos and sin"),
    (dict(k_weight=None), "both norm weights"),
    (dict(q_weight=torch.ones(8), k_weight=torch.ones(8)), "norm weights must be"),
    (dict(backend="cuda"), "backend"),
])
def test_split_rejects_bad_input(bad, match):
    args = dict(qkv=torch.zeros(1, 8, 3 * 2 * 16), heads=2, cos=torch.zeros(8, 8), sin=torch.zeros(8, 8),
                q_weight=torch.ones(16), k_weight=torch.ones(16))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        split_heads(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_split_and_merge_under_torch_compile(mode):
    qkv, cos, sin, weights, grads = _inputs(2, 300, 2, 64, torch.bfloat16, "cuda", seed=5)

    def f(x, wq, wk):
        q, k, v = split_heads(x, 2, cos, sin, wq, wk)
        return merge_heads(q * 2 + k - v)

    dy = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (f, torch.compile(f, mode=mode)):
        for _ in range(3):
            leaves = [x.detach().requires_grad_() for x in [qkv, *weights]]
            y = fn(*leaves)
            res = torch.autograd.grad(y, leaves, dy)
        outs.append([y, *res])
    for a, b in zip(*outs):
        # inductor rounds q * 2 + k - v once, eager after each op
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
