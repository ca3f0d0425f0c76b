"""The reference LLSA (``backend="torch"``) against the spec: a dense float64 oracle, known reductions,
selection rules, default levels and argument checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import llsa
from llsa.ops.llsa.levels import default_levels
from llsa.ops.llsa.naive import llsa_attention_torch
from oracle import oracle_attention, oracle_default_levels, pooling_matrices

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: a second intra-op thread only adds spin-waits, badly so on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, gen, dtype=F64, requires_grad=False):
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


def reference(q, k, v, **kw):
    return llsa.llsa_attention(q, k, v, backend="torch", **kw)


def selection_lists(sel: list[torch.Tensor]) -> list:
    """``hierarchical_topk`` output as ``[b][h][l][j]`` lists (l = 1..L, entry 0 unused), like the oracle's."""
    batch, heads = sel[0].shape[:2]
    return [[[None] + [s[b, h].tolist() for s in sel] for h in range(heads)] for b in range(batch)]


def check_against_oracle(n, block_size, levels, enrich_levels, reweight, topk, *, seed, batch=1, heads=2, d=8):
    """Output, dq, dk, dv and every level's selection of the reference equal the oracle's (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(batch, heads, n, d, gen=gen, requires_grad=True) for _ in range(3))
    grad_out = randn(batch, heads, n, d, gen=gen)
    kw = dict(block_size=block_size, topk=topk, levels=levels, enrich_levels=enrich_levels, reweight=reweight)

    want = oracle_attention(q, k, v, **kw)
    want_grads = torch.autograd.grad(want.out, (q, k, v), grad_out)
    got = reference(q, k, v, **kw)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)

    assert got.dtype == F64 and got.shape == q.shape
    torch.testing.assert_close(got, want.out, rtol=1e-10, atol=1e-10)
    for name, g_got, g_want in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")

    sel = llsa.hierarchical_topk(q, k, block_size=block_size, topk=topk, levels=levels)
    assert len(sel) == levels
    for level, s in enumerate(sel, start=1):
        n_l = math.ceil(n / block_size ** level)
        assert s.dtype == torch.int64 and s.shape == (batch, heads, n_l, min(topk, n_l))
    assert selection_lists(sel) == want.picks


# Every (N, B, L, E, reweight) on short sequences, where the oracle is cheap; topk=2 leaves real choices
# at B=2 and exceeds the candidate count wherever a level has fewer than 2 tokens.
SMALL = [(n, b, levels, e, rw) for n in (15, 17) for b in (2, 4) for levels in (1, 2, 3)
         for e in range(levels + 1) for rw in (True, False)]


@pytest.mark.parametrize("n,block_size,levels,enrich_levels,reweight", SMALL)
def test_matches_oracle_small_product(n, block_size, levels, enrich_levels, reweight):
    check_against_oracle(n, block_size, levels, enrich_levels, reweight, topk=2,
                         seed=SMALL.index((n, block_size, levels, enrich_levels, reweight)))


# (N, B, L, E, reweight, topk): the other lengths, B=16, and topk above the candidate count.
MIXED = [
    (1, 2, 1, 1, True, 1),
    (1, 2, 3, 3, True, 4),
    (1, 16, 2, 1, False, 8),
    (16, 2, 3, 0, True, 3),
    (16, 2, 3, 2, False, 3),
    (16, 4, 1, 1, True, 8),
    (16, 4, 2, 2, True, 2),
    (16, 16, 1, 1, True, 8),
    (16, 16, 2, 2, False, 8),
    (17, 16, 1, 0, True, 8),
    (17, 16, 2, 2, True, 1),
    (100, 2, 1, 1, True, 3),
    (100, 2, 3, 3, True, 3),
    (100, 2, 3, 1, False, 4),
    (100, 4, 2, 2, False, 2),
    (100, 4, 3, 2, True, 100),
    (100, 16, 1, 1, True, 3),
    (100, 16, 2, 2, True, 3),
    (100, 16, 3, 1, False, 2),
    (256, 2, 3, 3, False, 4),
    (256, 4, 2, 0, True, 4),
    (256, 4, 3, 3, True, 2),
    (256, 4, 3, 1, True, 3),
    (256, 16, 1, 1, True, 4),
    (256, 16, 2, 2, True, 8),
    (256, 16, 2, 1, False, 8),
    (256, 16, 3, 3, True, 8),
    (1000, 2, 3, 3, True, 3),
    (1000, 2, 3, 2, False, 2),
    (1000, 4, 2, 1, True, 4),
    (1000, 4, 3, 0, False, 3),
    (1000, 16, 1, 1, True, 8),
    (1000, 16, 2, 2, True, 8),
    (1000, 16, 2, 0, False, 2),
    (1000, 16, 3, 3, False, 8),
    (1000, 16, 3, 2, True, 2),
]


@pytest.mark.parametrize("n,block_size,levels,enrich_levels,reweight,topk", MIXED)
def test_matches_oracle_mixed(n, block_size, levels, enrich_levels, reweight, topk):
    check_against_oracle(n, block_size, levels, enrich_levels, reweight, topk, batch=2 if n <= 100 else 1,
                         seed=100 + MIXED.index((n, block_size, levels, enrich_levels, reweight, topk)))


def test_explicit_scale_matches_oracle():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (randn(1, 2, 40, 8, gen=gen) for _ in range(3))
    kw = dict(block_size=4, topk=3, levels=2, enrich_levels=2, reweight=True, scale=0.7)
    torch.testing.assert_close(reference(q, k, v, **kw), oracle_attention(q, k, v, **kw).out)


@pytest.mark.parametrize("n,block_size,levels,enrich_levels,reweight", [(45, 4, 2, 2, True), (45, 4, 2, 1, False),
                                                                     (30, 2, 3, 0, True)])
def test_lse_includes_weights_and_given_selection_is_used(n, block_size, levels, enrich_levels, reweight):
    """The saved log-sum-exp is ``ln sum_t w_t exp(s_t)``; a selection passed in (from ``hierarchical_topk``)
    gives the same result as the one computed inside."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = (randn(2, 2, n, 8, gen=gen) for _ in range(3))
    kw = dict(block_size=block_size, levels=levels, enrich_levels=enrich_levels, reweight=reweight)
    want = oracle_attention(q, k, v, topk=3, **kw)
    sel = llsa.hierarchical_topk(q, k, block_size=block_size, topk=3, levels=levels)
    for given in (None, sel):
        out, lse = llsa_attention_torch(q, k, v, topk=3, scale=1 / math.sqrt(8), sel=given, return_lse=True, **kw)
        torch.testing.assert_close(out, want.out)
        torch.testing.assert_close(lse, want.lse)


@pytest.mark.parametrize("n,block_size,levels,enrich_levels,reweight", [
    (10, 2, 2, 2, False),
    (17, 4, 2, 1, False),
    (13, 2, 3, 3, True),
    (9, 4, 1, 0, True),
])
def test_gradcheck(n, block_size, levels, enrich_levels, reweight):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (randn(1, 2, n, 4, gen=gen, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return reference(q, k, v, block_size=block_size, topk=2, levels=levels, enrich_levels=enrich_levels,
                         reweight=reweight)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("n,block_size,levels", [(37, 4, 2), (64, 2, 3), (5, 16, 1)])
def test_all_blocks_picked_without_enrichment_is_dense_attention(n, block_size, levels):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (randn(2, 3, n, 8, gen=gen, requires_grad=True) for _ in range(3))
    grad_out = randn(2, 3, n, 8, gen=gen)
    # topk >= the level-1 token count: every level picks all its candidates, so every block is attended
    topk = math.ceil(n / block_size)
    got = reference(q, k, v, block_size=block_size, topk=topk, levels=levels, enrich_levels=0, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, (q, k, v), grad_out),
                             torch.autograd.grad(want, (q, k, v), grad_out)):
        torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("enrich_levels,reweight,want_far,want_near", [
    (0, False, 0.0, 0.0),
    (0, True, 0.0, 0.0),
    (1, False, 0.0, 3 / 8),
    (1, True, 0.0, 3 / 5),
    (2, False, 1 / 12, 5 / 16),
    (2, True, 4 / 21, 2 / 7),
])
def test_enrichment_and_reweighting_closed_form(enrich_levels, reweight, want_far, want_near):
    """Equal scores everywhere (q = 0), so each output is the weighted mean of the values in the key set.

    N=64, B=4, L=2, K=1: every tie goes to index 0, so the key set of every query is fine tokens 0..3
    (weight 1), level-1 tokens 0..3 (children of level-2 token 0; weight 4 each with reweight) and all
    four level-2 tokens (weight 16). Value channel "far" marks tokens 48..63, seen only through level-2
    token 3; channel "near" marks tokens 4..15: level-1 tokens 1..3 carry 1, level-2 token 0 carries 0.75.
    """
    gen = torch.Generator().manual_seed(0)
    n = 64
    q = torch.zeros(1, 1, n, 2, dtype=F64)
    k = randn(1, 1, n, 2, gen=gen)
    v = torch.zeros(1, 1, n, 2, dtype=F64)
    v[..., 48:, 0] = 1.0
    v[..., 4:16, 1] = 1.0
    out = reference(q, k, v, block_size=4, topk=1, levels=2, enrich_levels=enrich_levels, reweight=reweight)
    want = torch.tensor([want_far, want_near], dtype=F64).expand(1, 1, n, 2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_reweighting_moves_output_toward_coarse_tokens():
    """Raising the weight of the coarse keys (from 1 to their counts) moves each output toward the
    coarse-only attention output and away from the fine-only one, on random inputs."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(1, 2, 200, 8, gen=gen) for _ in range(3))
    kw = dict(block_size=4, topk=2, levels=3, enrich_levels=3)
    fine = reference(q, k, v, **kw | dict(enrich_levels=0))
    plain = reference(q, k, v, **kw, reweight=False)
    heavy = reference(q, k, v, **kw, reweight=True)
    # with fixed fine keys, the output is a mix fine*(1-a) + coarse*a; reweighting raises each a
    dist_plain = (plain - fine).norm(dim=-1)
    dist_heavy = (heavy - fine).norm(dim=-1)
    assert (dist_heavy > dist_plain).float().mean() > 0.95
    assert (dist_plain > 0).all()


@pytest.mark.parametrize("reweight", [True, False])
def test_full_enrichment_adds_exactly_the_coarse_keys(reweight):
    """``o(E=L)`` is ``o(E=0)`` mixed with attention over exactly the coarse keys of the oracle's set,
    in the ratio of their weighted exponential sums: enrichment adds keys and changes nothing else."""
    gen = torch.Generator().manual_seed(2)
    n, levels, block_size = 150, 2, 4
    q, k, v = (randn(1, 1, n, 8, gen=gen) for _ in range(3))
    kw = dict(block_size=block_size, topk=3, levels=levels, reweight=reweight)
    without = oracle_attention(q, k, v, enrich_levels=0, **kw).weights[0][0]
    with_all = oracle_attention(q, k, v, enrich_levels=levels, **kw).weights[0][0]
    assert torch.equal(with_all[:, :n], without[:, :n])
    assert not without[:, n:].any() and (with_all[:, n:] > 0).any()

    pooling = pooling_matrices(n, block_size, levels)[1:]
    coarse_k = torch.cat([p @ k[0, 0] for p in pooling])
    coarse_v = torch.cat([p @ v[0, 0] for p in pooling])
    scale = 1 / math.sqrt(8)
    e_fine = without[:, :n] * torch.exp(scale * q[0, 0] @ k[0, 0].T)
    e_coarse = with_all[:, n:] * torch.exp(scale * q[0, 0] @ coarse_k.T)
    z_fine, z_coarse = e_fine.sum(-1, keepdim=True), e_coarse.sum(-1, keepdim=True)
    o_coarse = e_coarse @ coarse_v / z_coarse

    o_fine = reference(q, k, v, enrich_levels=0, **kw)[0, 0]
    o_all = reference(q, k, v, enrich_levels=levels, **kw)[0, 0]
    torch.testing.assert_close(o_all, (z_fine * o_fine + z_coarse * o_coarse) / (z_fine + z_coarse))


@pytest.mark.parametrize("n,block_size,levels,topk", [(300, 2, 4, 3), (1000, 4, 3, 2), (700, 16, 2, 3)])
def test_selection_is_hierarchical_in_range_and_ascending(n, block_size, levels, topk):
    gen = torch.Generator().manual_seed(3)
    q, k = randn(2, 2, n, 4, gen=gen), randn(2, 2, n, 4, gen=gen)
    sel = llsa.hierarchical_topk(q, k, block_size=block_size, topk=topk, levels=levels)
    for level, s in enumerate(sel, start=1):
        n_l = math.ceil(n / block_size ** level)
        assert s.min() >= 0 and s.max() < n_l
        assert (s[..., 1:] > s[..., :-1]).all(), "picks must be ascending and distinct"
    for level in range(1, levels):
        child, parent = sel[level - 1], sel[level]
        # every pick of level-l token j is a child of a pick of its parent j // B
        parent_of_query = parent[:, :, torch.arange(child.shape[2]) // block_size]
        is_child = (child[..., :, None] // block_size == parent_of_query[..., None, :]).any(-1)
        assert is_child.all()


def test_siblings_with_equal_queries_pick_alike_and_cousins_may_not():
    """Siblings share candidates: equal pooled queries under one parent pick the same tokens, while the same
    query under another parent picks only among that parent's candidates."""
    gen = torch.Generator().manual_seed(4)
    n, b = 64, 4
    q, k = randn(1, 1, n, 4, gen=gen), randn(1, 1, n, 4, gen=gen)
    # level-1 tokens 0 and 1 (siblings under level-2 token 0) get identical blocks of queries
    q[..., 4:8, :] = q[..., 0:4, :]
    sel = llsa.hierarchical_topk(q, k, block_size=b, topk=2, levels=2)
    assert sel[0][0, 0, 0].tolist() == sel[0][0, 0, 1].tolist()
    parents = sel[1][0, 0, 0].tolist()
    assert all(t // b in parents for t in sel[0][0, 0, 0].tolist())


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ties_go_to_the_smaller_index(levels):
    b, topk, n = 4, 3, 4 ** 4
    gen = torch.Generator().manual_seed(6)
    # identical key blocks: every pooled key of every level is the same vector, so every score ties
    k = randn(1, 1, b, 4, gen=gen).repeat(1, 1, n // b, 1)
    q = randn(1, 1, n, 4, gen=gen)
    for s in llsa.hierarchical_topk(q, k, block_size=b, topk=topk, levels=levels):
        assert (s == torch.arange(topk)).all()

    # zero queries tie every score at exactly 0, whatever the keys
    zero_q = torch.zeros(1, 1, n, 4, dtype=F64)
    for s in llsa.hierarchical_topk(zero_q, randn(1, 1, n, 4, gen=gen), block_size=b, topk=topk, levels=levels):
        assert (s == torch.arange(topk)).all()


def test_exact_tie_between_two_best_blocks_keeps_the_smaller():
    gen = torch.Generator().manual_seed(7)
    n, b = 32, 4
    k = 0.1 * randn(1, 1, n, 4, gen=gen)
    u = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)
    k[..., 8:12, :] = u
    k[..., 20:24, :] = u
    q = u.expand(1, 1, n, 4).clone()
    one = llsa.hierarchical_topk(q, k, block_size=b, topk=1, levels=1)[0]
    assert (one == 2).all()
    two = llsa.hierarchical_topk(q, k, block_size=b, topk=2, levels=1)[0]
    assert (two == torch.tensor([2, 5])).all()


@pytest.mark.parametrize("n,want", [(16384, 2), (65536, 3), (262144, 3), (1048576, 4), (1, 1), (15, 1),
                                    (16, 1), (255, 1), (256, 1), (4095, 1), (4096, 2)])
def test_default_levels_at_block_16(n, want):
    assert oracle_default_levels(n, 16) == want
    assert default_levels(n, 16) == want


def test_default_levels_agrees_with_integer_formula():
    for b in (2, 3, 4, 16):
        for n in list(range(1, 600)) + [b ** m + d for m in range(2, 9) for d in (-1, 0, 1)]:
            assert default_levels(n, b) == oracle_default_levels(n, b), (n, b)


def test_default_levels_is_used_when_levels_is_none():
    gen = torch.Generator().manual_seed(8)
    n = 4 ** 5 + 3
    q, k, v = (randn(1, 1, n, 2, gen=gen) for _ in range(3))
    assert len(llsa.hierarchical_topk(q, k, block_size=4, topk=2)) == 4
    kw = dict(block_size=4, topk=2)
    torch.testing.assert_close(reference(q, k, v, **kw), reference(q, k, v, levels=4, enrich_levels=4, **kw))


def test_levels_beyond_a_single_token_match_oracle():
    # N=20, B=4: level 2 has 2 tokens, levels 3..5 hold a single token each
    check_against_oracle(20, 4, 5, 5, True, topk=2, seed=9)
    check_against_oracle(20, 4, 5, 3, False, topk=2, seed=10)


@pytest.mark.parametrize("n,block_size,levels,topk", [(256, 4, 3, 3), (1024, 16, 2, 8), (64, 2, 4, 5)])
def test_keys_per_query_counts_the_oracle_key_set(n, block_size, levels, topk):
    """When N is a multiple of B^L every block is full, and the spec's count is exact for every query."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (randn(1, 1, n, 4, gen=gen) for _ in range(3))
    for e in range(levels + 1):
        w = oracle_attention(q, k, v, block_size=block_size, topk=topk, levels=levels, enrich_levels=e,
                             reweight=False).weights[0][0]
        assert ((w > 0).sum(-1) == llsa.keys_per_query(n, block_size, topk, levels, e)).all()
    if topk <= math.ceil(n / block_size ** levels):
        want = topk * block_size * (1 + levels - 1) + math.ceil(n / block_size ** levels)
        assert llsa.keys_per_query(n, block_size, topk, levels, levels) == want


def _qkv(shape=(1, 2, 32, 8), dtype=F64, device="cpu"):
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(3))


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(2, 32, 8)), "`q`.*shape"),
    (dict(k=torch.zeros(1, 2, 32, 8, 1)), "`k`.*shape"),
    (dict(v=torch.zeros(1, 2, 31, 8, dtype=F64)), "`v`.*shape"),
    (dict(k=torch.zeros(1, 2, 32, 4, dtype=F64)), "`k`.*shape"),
    (dict(v=torch.zeros(1, 2, 32, 8, dtype=torch.float32)), "`v`.*float32"),
    (dict(k=torch.zeros(1, 2, 32, 8, dtype=F64, device="meta")), "`k`.*meta"),
    (dict(q=torch.zeros(1, 2, 0, 8, dtype=F64), k=torch.zeros(1, 2, 0, 8, dtype=F64),
          v=torch.zeros(1, 2, 0, 8, dtype=F64)), "N = 0"),
    (dict(block_size=1), "`block_size`"),
    (dict(topk=0), "`topk`"),
    (dict(levels=0), "`levels`"),
    (dict(levels=2, enrich_levels=3), "`enrich_levels`"),
    (dict(levels=2, enrich_levels=-1), "`enrich_levels`"),
    (dict(backend="fast"), "`backend`"),
])
def test_bad_arguments_are_named(change, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, block_size=4, topk=2, backend="torch") | change
    with pytest.raises((ValueError, TypeError), match=match):
        llsa.llsa_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(32, 8, dtype=F64)), "`q`"),
    (dict(k=torch.zeros(1, 2, 16, 8, dtype=F64)), "`k`"),
    (dict(block_size=0), "`block_size`"),
    (dict(topk=-1), "`topk`"),
    (dict(levels=0), "`levels`"),
])
def test_hierarchical_topk_bad_arguments_are_named(change, match):
    q, k, _ = _qkv()
    args = dict(q=q, k=k, block_size=4, topk=2) | change
    with pytest.raises((ValueError, TypeError), match=match):
        llsa.hierarchical_topk(args.pop("q"), args.pop("k"), **args)


def test_non_contiguous_inputs_match_contiguous():
    gen = torch.Generator().manual_seed(12)
    # [b, N, h, D] -> [b, h, N, D]: the layout a projection followed by a transpose produces
    q, k, v = (randn(2, 70, 3, 8, gen=gen).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    kw = dict(block_size=4, topk=3, levels=2)
    grad_out = randn(2, 3, 70, 8, gen=gen)
    got = reference(q, k, v, **kw)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    want = reference(qc, kc, vc, **kw)
    want_grads = torch.autograd.grad(want, (qc, kc, vc), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g_got, g_want in zip(got_grads, want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float32, 1e-5),
                                       (F64, 0)])
def test_output_dtype_follows_q(dtype, tol):
    gen = torch.Generator().manual_seed(13)
    q, k, v = (randn(1, 2, 48, 8, gen=gen).to(dtype).requires_grad_() for _ in range(3))
    kw = dict(block_size=4, topk=2, levels=2)
    out = reference(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    out.float().square().sum().backward()
    assert all(t.grad.dtype == dtype and t.grad.isfinite().all() for t in (q, k, v))
    # the same rounded inputs in float64
    want = reference(*(t.detach().double() for t in (q, k, v)), **kw)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
