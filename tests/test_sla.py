"""SLA: the reference against a dense float64 oracle written from the definition, the Triton path
(interpreter on CPU) against the reference, known reductions, and option checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from baseline_checks import assert_is_full_attention, assert_modules_agree, grads, rand
from llsa.attention import build
from llsa.ops.sla import EPS, sla_attention
from llsa.ops.sla.naive import sla_select


def dense_sla(q, k, v, w, bias, block_size, topk, feature_map):
    """SLA from its definition with dense (N x N) masks: the marginal keys are every token outside the
    critical blocks, summed directly (no per-block states, no subtraction)."""
    n, d = q.shape[-2:]
    nb = math.ceil(n / block_size)
    p = torch.zeros(nb, n, dtype=q.dtype)
    for j in range(nb):
        lo, hi = j * block_size, min((j + 1) * block_size, n)
        p[j, lo:hi] = 1.0 / (hi - lo)
    kc = k - k.mean(-2, keepdim=True)
    s = (p @ q) @ (p @ kc).transpose(-1, -2)
    sel = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[..., : min(topk, nb)]
    block_mask = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, sel, True)
    blk = torch.arange(n) // block_size
    critical = block_mask[..., blk, :][..., blk]
    o_sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=critical)
    phi = (lambda t: torch.softmax(t, -1)) if feature_map == "softmax" else (lambda t: F.elu(t) + 1)
    a = (phi(q) @ phi(k).transpose(-1, -2)).masked_fill(critical, 0.0)
    o_linear = (a @ v) / (a.sum(-1, keepdim=True) + EPS)
    return o_sparse + o_linear @ w.T + bias


@pytest.mark.parametrize("n,topk,feature_map", [(50, 2, "softmax"), (48, 1, "elu"), (37, 4, "softmax")])
def test_reference_matches_dense_definition(n, topk, feature_map):
    gen = torch.Generator().manual_seed(n + topk)
    q, k, v = (rand(gen, 2, 2, n, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
    w = rand(gen, 16, 16, dtype=torch.float64).requires_grad_()
    bias = rand(gen, 16, dtype=torch.float64).requires_grad_()
    out = sla_attention(q, k, v, w, bias, block_size=8, topk=topk, feature_map=feature_map, backend="torch")
    ref = dense_sla(q, k, v, w, bias, 8, topk, feature_map)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    do = rand(gen, *out.shape, dtype=torch.float64)
    for g, g_ref in zip(grads(out, (q, k, v, w, bias), do), grads(ref, (q, k, v, w, bias), do)):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8)


def test_selection_scores_use_centred_keys():
    """A shift shared by every key changes pooled q . pooled k but not the centred ranking."""
    gen = torch.Generator().manual_seed(1)
    q, k = rand(gen, 1, 1, 64, 16), rand(gen, 1, 1, 64, 16)
    shift = 50.0 * rand(gen, 1, 1, 1, 16)
    torch.testing.assert_close(sla_select(q, k + shift, block_size=16, topk=2),
                               sla_select(q, k, block_size=16, topk=2))


def _module_pair(dim, heads, topk, feature_map, device, gen):
    """The same SLA layer twice (torch and triton backends) with a random, nonzero projection."""
    d = dim // heads
    torch_mod = build("sla", dim, heads, block_size=16, topk=topk, feature_map=feature_map, backend="torch")
    with torch.no_grad():
        torch_mod.proj.weight.copy_(rand(gen, d, d, scale=0.5))
        torch_mod.proj.bias.copy_(rand(gen, d))
    triton_mod = build("sla", dim, heads, block_size=16, topk=topk, feature_map=feature_map, backend="triton")
    triton_mod.load_state_dict(torch_mod.state_dict())
    return torch_mod, triton_mod.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,topk,hot,feature_map", [(50, 2, False, "softmax"), (64, 9, False, "elu"),
                                                    (40, 1, True, "softmax"), (64, 2, False, "elu")])
def test_triton_matches_reference(device, dtype, n, topk, hot, feature_map):
    """Output and every gradient (q, k, v, projection weight and bias). ``hot``: one key block dominates,
    so every query block picks it and its key-major list is as long as the number of query blocks."""
    gen = torch.Generator().manual_seed(5 * n + topk)
    b, heads, d = 1, 2, 32
    q = rand(gen, b, heads, n, d, shift=1.0 if hot else 0.0)
    k = rand(gen, b, heads, n, d)
    if hot:
        k[:, :, 16:32] += 3.0
    v = rand(gen, b, heads, n, d)
    torch_mod, triton_mod = _module_pair(heads * d, heads, topk, feature_map, device, gen)
    if hot:
        sel = sla_select(q, k, block_size=16, topk=topk)
        assert (sel == 1).any(-1).all(), "the test needs every query block to pick key block 1"

    assert_modules_agree(torch_mod, triton_mod, q, k, v, dtype=dtype, device=device, gen=gen, low_tol=2e-2,
                         param_names=("dproj_w", "dproj_b"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_blocks_is_full_attention(device, backend):
    """With every block critical the linear branch is empty, so only P's bias remains (zero here, with
    a random weight that would expose any leftover of the linear branch)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand(gen, 1, 2, 45, 32, device=device).requires_grad_() for _ in range(3))
    w = rand(gen, 32, 32, device=device)
    out = sla_attention(q, k, v, w, torch.zeros(32, device=device), block_size=16, topk=3, backend=backend)
    assert_is_full_attention(out, q, k, v, gen)


def test_module_defaults_and_errors():
    layer = build("sla", 64, 2, topk=1)
    assert layer.proj.weight.dtype == torch.float32
    assert layer.proj.weight.abs().sum() == 0 and layer.proj.bias.abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    q, k, v = (rand(gen, 1, 2, 40, 32) for _ in range(3))
    # a zero projection leaves only the sparse branch, and x is not needed
    sparse = sla_attention(q, k, v, torch.zeros(32, 32), torch.zeros(32), topk=1, backend="torch")
    torch.testing.assert_close(layer(q, k, v), sparse)
    with pytest.raises(ValueError, match="feature_map"):
        build("sla", 64, 2, feature_map="relu")
    with pytest.raises(ValueError, match="topk"):
        build("sla", 64, 2, topk=-1)
    with pytest.raises(ValueError, match="block_size"):
        build("sla", 64, 2, block_size=True)
    with pytest.raises(ValueError, match="proj_weight"):
        sla_attention(q, k, v, torch.zeros(16, 16), backend="torch")
    with pytest.raises(ValueError, match="shape"):
        sla_attention(q, k[:, :, :20], v, backend="torch")
    with pytest.raises(ValueError, match="power of two >= 16"):
        sla_attention(q, k, v, block_size=24, backend="triton")


def test_triton_other_block_and_head_sizes(device):
    """block_size 32 (two key blocks per tile), D=64, batch 2: the functional API on both backends."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = (rand(gen, 2, 1, 70, 64) for _ in range(3))
    w, bias = rand(gen, 64, 64, scale=0.2), rand(gen, 64)
    args = dict(block_size=32, topk=1, feature_map="elu")
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ker_in = [t.to(device).requires_grad_() for t in (q, k, v)]
    ref = sla_attention(*ref_in, w, bias, backend="torch", **args)
    out = sla_attention(*ker_in, w.to(device), bias.to(device), backend="triton", **args)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    do = rand(gen, *ref.shape)
    for g, g_ref in zip(grads(out, ker_in, do.to(device)), grads(ref, ref_in, do)):
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-4, atol=1e-4)


def test_autocast_leaves_the_float32_parts_alone():
    """Under mixed precision the op computes exactly as without it (nothing rounded to bf16 inside)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (rand(gen, 1, 2, 64, 32) for _ in range(3))
    w, bias = rand(gen, 32, 32), rand(gen, 32)
    plain = sla_attention(q, k, v, w, bias, topk=1, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sla_attention(q, k, v, w, bias, topk=1, backend="torch")
    assert torch.equal(plain, mixed)
