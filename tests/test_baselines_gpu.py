"""VSA and SLA Triton kernels in bf16/fp16 on the GPU, judged by the FlashAttention rule: against the
float32 reference, the kernel's max-abs error may be at most twice the low-precision reference's error
plus a small floor. Kernel outputs are poisoned with NaN first."""
import pytest
import torch

from llsa.attention import build
from llsa.ops import poison as poison_mod
from llsa.ops.blocksparse import num_blocks
from llsa.ops.sla import sla_attention
from llsa.ops.vsa import vsa_attention
from llsa.testing import assert_flash_rule

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(poison_mod, "ENABLED", True)


def _attend(method, q, k, v, extra, backend, topk):
    """``extra``: the method's own tensors (VSA: the gate; SLA: the projection weight and bias)."""
    if method == "vsa":
        return vsa_attention(q, k, v, extra[0], block_size=16, topk=topk, backend=backend)
    return sla_attention(q, k, v, *extra, block_size=16, topk=topk, backend=backend)


def check_flash_rule(method, dtype, n, d, scale, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h = 1, 2
    nb = num_blocks(n, 16)
    # K below the block count, so VSA's selection matters and SLA's linear branch is not empty. SLA needs a
    # few marginal blocks: with one marginal block and a peaked feature map (scale 10) its denominator is
    # tiny next to the rounding noise of global-minus-selected, and every path returns noise there.
    topk = min(8, nb - 1) if method == "vsa" else (min(8, nb - 4) if nb > 4 else nb)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) * scale for _ in range(3))
    if method == "vsa":
        extra = [torch.randn(b, h, n, d, generator=gen)]
    else:
        extra = [torch.randn(d, d, generator=gen) / d ** 0.5, torch.randn(d, generator=gen)]
    do = torch.randn(b, h, n, d, generator=gen)
    # every path sees the same low-precision values; the reference computes on them in float32
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    if method == "vsa":
        extra[0] = extra[0].to(dtype)

    def run(backend, cast):
        ins = [t.to(device, cast).requires_grad_() for t in (q, k, v)]
        ext = [t.to(device, cast if t.dim() == 4 else torch.float32).requires_grad_() for t in extra]
        out = _attend(method, *ins, ext, backend, topk)
        g = torch.autograd.grad(out, ins + ext, do.to(device, out.dtype))
        return [out, *g]

    ref = run("torch", torch.float32)
    low = run("torch", dtype)
    ker = run("triton", dtype)
    names = ["out", "dq", "dk", "dv"] + [f"d{i}" for i in range(len(extra))]
    for name, r, lo, kr in zip(names, ref, low, ker):
        assert kr.dtype == lo.dtype, name
        assert torch.isfinite(kr).all(), f"{name}: non-finite values (poisoned rows never written?)"
        assert_flash_rule(f"{method} {dtype} N={n} D={d} scale={scale} {name}", kr, r, lo)


@pytest.mark.parametrize("scale", [0.1, 10.0])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("n", [17, 1000, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["vsa", "sla"])
def test_flash_rule(method, dtype, n, d, scale):
    check_flash_rule(method, dtype, n, d, scale, torch.device("cuda"))


@pytest.mark.parametrize("name", ["vsa", "sla"])
def test_auto_backend_runs_kernels_on_cuda(name, monkeypatch):
    """``backend="auto"`` must take the kernels on CUDA: make the reference path unreachable."""
    import llsa.ops.sla as sla_ops
    import llsa.ops.vsa as vsa_ops

    def fail(*args, **kwargs):
        raise AssertionError("auto picked the PyTorch reference on CUDA")

    monkeypatch.setattr(vsa_ops, "vsa_attention_torch", fail)
    monkeypatch.setattr(sla_ops, "sla_attention_torch", fail)
    layer = build(name, 128, 2, topk=4).cuda()
    q, k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    out = layer(q, k, v, x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
