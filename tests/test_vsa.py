"""VSA: the reference against a dense float64 oracle written from the definition, the Triton path
(interpreter on CPU) against the reference, known reductions, and option checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from baseline_checks import assert_is_full_attention, assert_modules_agree, grads, rand
from llsa.attention import build
from llsa.ops import poison as poison_mod
from llsa.ops.blocksparse import interface as bs_interface
from llsa.ops.blocksparse import topk_blocks
from llsa.ops.vsa import vsa_attention
from llsa.ops.vsa.naive import vsa_coarse


def test_kernel_outputs_are_poisoned_under_test():
    """conftest sets LLSA_POISON=1: kernel outputs start as NaN, so a row no kernel writes fails."""
    assert poison_mod.ENABLED


def pool_matrix(n, block_size):
    """(n_blocks, N): row j averages the real tokens of block j."""
    nb = math.ceil(n / block_size)
    p = torch.zeros(nb, n, dtype=torch.float64)
    for j in range(nb):
        lo, hi = j * block_size, min((j + 1) * block_size, n)
        p[j, lo:hi] = 1.0 / (hi - lo)
    return p


def dense_vsa(q, k, v, gate, block_size, topk):
    """VSA from its definition with dense (N x N) masks, in the inputs' dtype (float64 in the tests)."""
    n, d = q.shape[-2:]
    scale = 1.0 / math.sqrt(d)
    p = pool_matrix(n, block_size).to(q.dtype)
    pq, pk, pv = p @ q, p @ k, p @ v
    s = pq @ pk.transpose(-1, -2) * scale
    kk = min(topk, s.shape[-1])
    # stable descending sort: ties keep the smaller block index first
    sel = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[..., :kk]
    block_mask = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, sel, True)
    blk = torch.arange(n) // block_size
    token_mask = block_mask[..., blk, :][..., blk]
    o_fine = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    o_coarse = (torch.softmax(s, -1) @ pv)[..., blk, :]
    return o_fine + gate * o_coarse


@pytest.mark.parametrize("n,topk", [(50, 2), (48, 1), (37, 5)])
def test_reference_matches_dense_definition(n, topk):
    gen = torch.Generator().manual_seed(n + topk)
    q, k, v, gate = (rand(gen, 2, 2, n, 16, dtype=torch.float64).requires_grad_() for _ in range(4))
    out = vsa_attention(q, k, v, gate, block_size=8, topk=topk, backend="torch")
    ref = dense_vsa(q, k, v, gate, 8, topk)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = rand(gen, *out.shape, dtype=torch.float64)
    for g, g_ref in zip(grads(out, (q, k, v, gate), do), grads(ref, (q, k, v, gate), do)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_ties_go_to_smaller_index(dtype):
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [-2.0, -0.5, -2.0, -7.0, -0.5]], dtype=dtype)
    assert topk_blocks(scores, 2).tolist() == [[1, 2], [1, 4]]
    assert topk_blocks(scores, 3).tolist() == [[1, 2, 4], [0, 1, 4]]
    assert topk_blocks(scores, 9).tolist() == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("topk", [7, 25])
def test_float32_selection_matches_stable_sort(topk):
    """The integer-key topk used for float32 against a stable sort, on rounded scores full of ties, both
    signs and both zeros (K=25 puts the cut among the zeros)."""
    gen = torch.Generator().manual_seed(5)
    scores = (torch.randn(64, 40, generator=gen) * 4).round() / 4
    scores[:, ::3] = -0.0
    scores[:, 1::3] = torch.where(scores[:, 1::3] == 0, 0.0, scores[:, 1::3])
    expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :topk].sort(-1).values
    assert torch.equal(topk_blocks(scores, topk), expected)


@pytest.mark.parametrize("sliced", [False, True])
def test_key_major_lists_transpose_the_selection(device, sliced):
    """``sliced``: the picks are a view of larger picks (rows spaced apart in memory), read in place."""
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(2, 3, 8 if sliced else 6, 6, generator=gen)
    scores[..., 4] += 5.0
    idx = topk_blocks(scores, 3).to(device)[:, :, :6]
    assert idx.is_contiguous() != sliced
    start, klist = bs_interface.transpose_blocks(idx, 6)
    flat = idx.reshape(6, 6, 3).cpu()
    for bh in range(6):
        for j in range(6):
            pos = klist[bh, start[bh, j]:start[bh, j + 1]].cpu().long()
            # flat pick positions: query block pos // K, slot pos % K, which holds j
            assert (flat[bh].flatten()[pos] == j).all(), (bh, j)
            got = sorted((pos // 3).tolist())
            assert got == [i for i in range(6) if j in flat[bh, i].tolist()], (bh, j)


def _module_pair(dim, heads, topk, device, gen):
    """The same VSA layer twice (torch and triton backends) with a random, nonzero gate."""
    torch_mod = build("vsa", dim, heads, block_size=16, topk=topk, backend="torch")
    with torch.no_grad():
        torch_mod.gate.weight.copy_(rand(gen, dim, dim, scale=0.2))
        torch_mod.gate.bias.copy_(rand(gen, dim))
    triton_mod = build("vsa", dim, heads, block_size=16, topk=topk, backend="triton")
    triton_mod.load_state_dict(torch_mod.state_dict())
    return torch_mod, triton_mod.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,topk,hot", [(50, 2, False), (64, 9, False), (40, 2, True)])
def test_triton_matches_reference(device, dtype, n, topk, hot):
    """Output and every gradient (q, k, v, gate weight and bias). ``hot``: one key block dominates, so
    every query block picks it and its key-major list is as long as the number of query blocks."""
    gen = torch.Generator().manual_seed(7 * n + topk)
    b, heads, d = 1, 2, 32
    dim = heads * d
    shift = 1.0 if hot else 0.0
    q = rand(gen, b, heads, n, d, shift=shift)
    k = rand(gen, b, heads, n, d)
    if hot:
        k[:, :, 16:32] += 3.0
    v = rand(gen, b, heads, n, d)
    x = rand(gen, b, n, dim)
    torch_mod, triton_mod = _module_pair(dim, heads, topk, device, gen)
    if hot:
        _, sel = vsa_coarse(q, k, v, block_size=16, topk=topk, scale=d ** -0.5)
        assert (sel == 1).any(-1).all(), "the test needs every query block to pick key block 1"

    assert_modules_agree(torch_mod, triton_mod, q, k, v, x, dtype=dtype, device=device, gen=gen, low_tol=1e-2,
                         param_names=("dgate_w", "dgate_b"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_blocks_and_zero_gate_is_full_attention(device, backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (rand(gen, 1, 2, 45, 32, device=device).requires_grad_() for _ in range(3))
    gate = torch.zeros_like(q)
    out = vsa_attention(q, k, v, gate, block_size=16, topk=3, backend=backend)
    assert_is_full_attention(out, q, k, v, gen)


def test_module_defaults_and_errors():
    layer = build("vsa", 64, 2, topk=3)
    assert layer.gate.weight.abs().sum() == 0 and layer.gate.bias.abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    q, k, v = (rand(gen, 1, 2, 40, 32) for _ in range(3))
    x = rand(gen, 1, 40, 64)
    # a zero gate leaves only the fine branch
    fine = vsa_attention(q, k, v, torch.zeros_like(q), topk=3, backend="torch")
    torch.testing.assert_close(layer(q, k, v, x), fine)
    with pytest.raises(ValueError, match="`x`"):
        layer(q, k, v)
    with pytest.raises(ValueError, match="`x`"):
        layer(q, k, v, x[:, :30])
    with pytest.raises(ValueError, match="block_size"):
        build("vsa", 64, 2, block_size=0)
    with pytest.raises(ValueError, match="topk"):
        build("vsa", 64, 2, topk=0)
    with pytest.raises(ValueError, match="backend"):
        build("vsa", 64, 2, backend="cuda")
    with pytest.raises(TypeError, match="no option"):
        build("vsa", 64, 2, feature_map="elu")
    with pytest.raises(ValueError, match="gate"):
        vsa_attention(q, k, v, x, backend="torch")
    with pytest.raises(ValueError, match="power of two >= 16"):
        vsa_attention(q, k, v, block_size=8, backend="triton")
    q24 = rand(gen, 1, 1, 20, 24)
    with pytest.raises(ValueError, match="head dim"):
        vsa_attention(q24, q24, q24, backend="triton")


def test_triton_other_block_and_head_sizes(device):
    """block_size 32 (two key blocks per tile), D=64, batch 2, no gate: the functional API."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = (rand(gen, 2, 1, 70, 64) for _ in range(3))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ker_in = [t.to(device).requires_grad_() for t in (q, k, v)]
    ref = vsa_attention(*ref_in, block_size=32, topk=2, backend="torch")
    out = vsa_attention(*ker_in, block_size=32, topk=2, backend="triton")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    do = rand(gen, *ref.shape)
    for g, g_ref in zip(grads(out, ker_in, do.to(device)), grads(ref, ref_in, do)):
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-4, atol=1e-4)


def test_autocast_leaves_the_float32_parts_alone():
    """Under mixed precision the op computes exactly as without it (nothing rounded to bf16 inside)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v, gate = (rand(gen, 1, 2, 64, 32) for _ in range(4))
    plain = vsa_attention(q, k, v, gate, topk=1, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = vsa_attention(q, k, v, gate, topk=1, backend="torch")
    assert torch.equal(plain, mixed)
