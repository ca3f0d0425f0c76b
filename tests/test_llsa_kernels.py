"""LLSA Triton kernels against the reference backend.

On a CPU machine these run under TRITON_INTERPRET=1 (set by conftest) on tiny shapes: a few programs each.
With a GPU they run the compiled kernels on the same shapes.
"""
import pytest
import torch

from llsa import llsa_attention
from llsa.ops.llsa import graphs
from llsa.ops.llsa.interface import hierarchical_topk_triton, llsa_attention_triton
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.naive import hierarchical_topk, llsa_attention_torch, pool_levels
from llsa.ops.llsa.pool import pool_qkv
from llsa.ops.common.transpose import transpose_picks


@pytest.fixture(autouse=True)
def _no_captured_graphs():
    """On a GPU small calls replay CUDA graphs (graphs.py), keyed by shapes and arguments but not by the launch
    shapes in TUNE: a graph an earlier test captured would replay its launches where a test sets others, and
    a test that records the launcher's decisions would see none. Every test starts without graphs."""
    graphs.clear()
    yield
    graphs.clear()


# (N, block, topk, levels, enrich, reweight): N off the block grid, levels 1-3, every enrichment depth,
# reweight off, and topk above the candidate count (40 tokens hold only 3 blocks).
CASES = [
    (100, 16, 2, 1, 1, True),
    (300, 16, 3, 2, 2, True),
    (300, 16, 3, 2, 1, False),
    (300, 16, 3, 2, 0, True),
    (700, 16, 2, 3, 3, True),
    (700, 16, 2, 3, 2, True),
    (40, 16, 8, 2, 2, True),
    (200, 32, 2, 1, 0, True),
]


def _inputs(n, d, dtype, device, shape=(1, 2), scale=1.0):
    return [(torch.randn(*shape, n, d, device=device) * scale).to(dtype).requires_grad_() for _ in range(3)]


def _tol(dtype):
    return 2e-5 if dtype == torch.float32 else 2e-2


def _check(n, block, topk, levels, enrich, reweight, dtype, device, d=16, inputs=None):
    q, k, v = inputs or _inputs(n, d, dtype, device)
    args = dict(block_size=block, topk=topk, levels=levels, enrich_levels=enrich, reweight=reweight,
                scale=d ** -0.5)
    sel = hierarchical_topk(q.detach().float(), k.detach().float(), block_size=block, topk=topk, levels=levels)
    o, lse = llsa_attention_triton(q, k, v, return_lse=True, **args)
    # the reference runs in float32 on the kernels' picks, so low-precision runs compare like with like
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ro, rlse = llsa_attention_torch(q32, k32, v32, sel=sel, return_lse=True, **args)
    do = torch.randn_like(ro)
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype))
    rgrads = torch.autograd.grad(ro, (q32, k32, v32), do)
    tol = _tol(dtype)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.float(), ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rlse, atol=tol, rtol=tol)
    for name, g, rg in zip("qkv", grads, rgrads):
        assert not torch.isnan(g).any(), f"d{name} has unwritten (NaN) elements"
        torch.testing.assert_close(g.float(), rg, atol=tol * 5, rtol=tol * 5, msg=f"d{name} mismatch")


def _check_on_the_grid(case, device):
    """``_check`` in float32 for an EVEN_CASES-like case: one head at 4,096 tokens and more keeps the
    interpreter quick, the small cases run two."""
    shape = (1, 1) if case[0] >= 4096 else (1, 2)
    _check(*case, torch.float32, device, inputs=_inputs(case[0], 16, torch.float32, device, shape=shape))


def _record(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that appends each result to the returned list."""
    seen, fn = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: seen.append(fn(*args)) or seen[-1])
    return seen


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-B{}-K{}-L{}-E{}-rw{}".format(*c))
def test_kernels_match_reference_fp32(case, device):
    torch.manual_seed(sum(case[:5]))
    _check(*case, torch.float32, device)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["L2", "L3"])
def test_kernels_match_reference_fp16(case, device):
    torch.manual_seed(7)
    _check(*case, torch.float16, device, d=32)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["L2", "L3"])
def test_kernels_match_reference_at_head_dim_128(case, device):
    """Head dim 128 runs its own launch shapes (``tuning.TUNE_WIDE``)."""
    torch.manual_seed(8)
    _check(*case, torch.float16, device, d=128)


@pytest.mark.parametrize("rows", [64, 256], ids=["one-level-per-launch", "two-levels-per-launch"])
@pytest.mark.parametrize("n, levels", [(300, 2), (700, 3), (5000, 3)])
def test_pooling_matches_reference_and_writes_the_cast_copies(n, levels, rows, device):
    """Every level's means of q, k and v, partial trailing blocks included, and the pooled k / v copies in
    the inputs' dtype that the attention kernels read (poisoned first, so an unwritten row fails). With the
    copies, the float32 v plane is only written where a later launch pools from it; alone, all of it."""
    torch.manual_seed(n + levels)
    q, k, v = (torch.randn(2, n, 16, device=device).half() for _ in range(3))
    lay = Layout(n, 16, 2, levels, levels)
    kv = torch.full((2, 2, lay.n_pool, 16), float("nan"), device=device, dtype=torch.float16)
    pooled = pool_qkv(q, k, v, lay, rows=rows, kv_out=kv)
    alone = pool_qkv(q, k, v, lay, rows=rows)
    for i, x in enumerate((q, k, v)):
        for level, ref in enumerate(pool_levels(x.float(), 16, levels), start=1):
            rows_l = slice(lay.pool_off[level], lay.pool_off[level] + lay.sizes[level])
            torch.testing.assert_close(alone[i][:, rows_l], ref, atol=1e-5, rtol=1e-5)
            if i < 2:
                torch.testing.assert_close(pooled[i][:, rows_l], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kv, alone[1:].half())
    with pytest.raises(ValueError, match="kv_out must be"):
        pool_qkv(q, k, v, lay, kv_out=kv[:, :, 1:])


@pytest.mark.parametrize("dense_max", [1024, 0], ids=["kernel-top", "torch-top"])
def test_selection_matches_reference(device, dense_max, monkeypatch):
    """Both ways of picking at the coarsest level: the dense kernel and the chunked sort for huge tops."""
    from llsa.ops.llsa import select as select_mod

    monkeypatch.setattr(select_mod, "DENSE_MAX", dense_max)
    torch.manual_seed(3)
    for n, block, topk, levels in [(300, 16, 3, 2), (700, 16, 2, 3), (40, 16, 8, 2), (1000, 16, 4, 1)]:
        q, k = torch.randn(2, 1, n, 16, device=device), torch.randn(2, 1, n, 16, device=device)
        got = hierarchical_topk_triton(q, k, block_size=block, topk=topk, levels=levels)
        want = hierarchical_topk(q, k, block_size=block, topk=topk, levels=levels)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w.cpu())


def test_selection_breaks_exact_ties_towards_the_smaller_index(device):
    """Exact ties: repeated key blocks score alike and zero queries score every candidate 0; negative
    scores must order below positive ones. Small integers make every pooled score exact whatever order a
    dot product sums in (the interpreter's dot is a BLAS call whose rounding depends on the column)."""
    torch.manual_seed(4)
    n = 1024
    q, k = (torch.randint(-3, 4, (1, 2, n, 16), device=device).float() for _ in range(2))
    # blocks 8..15 repeat blocks 0..7 exactly; level-2 token 1 repeats token 0
    k[..., 128:256, :] = k[..., :128, :]
    k[..., 256:512, :] = k[..., :256, :]
    q[:, 0, :64] = 0
    q[:, 1, 300:400] *= -1
    for levels in (1, 2):
        got = hierarchical_topk_triton(q, k, block_size=16, topk=3, levels=levels)
        want = hierarchical_topk(q, k, block_size=16, topk=3, levels=levels)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w.cpu())


def test_many_queries_pick_one_key_block(device):
    """Every query block picks block 3 (its keys align with every query), stressing the key-major lists."""
    torch.manual_seed(11)
    n, d = 300, 16
    q, k, v = (x.detach() for x in _inputs(n, d, torch.float32, device))
    direction = torch.randn(d, device=device)
    q = q + 3 * direction
    k[..., 48:64, :] += 3 * direction
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    sel = hierarchical_topk(q, k, block_size=16, topk=2, levels=2)[0]
    assert bool((sel == 3).any(-1).all()), "construction failed: not every block picked block 3"
    _check(n, 16, 2, 2, 2, True, torch.float32, device, inputs=inputs)


def test_transposed_lists_invert_the_picks(device):
    torch.manual_seed(5)
    lay = Layout(700, 16, 3, 2, 2)
    q, k = torch.randn(1, 2, 700, 16, device=device), torch.randn(1, 2, 700, 16, device=device)
    picks = hierarchical_topk(q, k, block_size=16, topk=3, levels=2)
    sel = torch.cat([p.flatten(2) for p in picks], dim=-1).flatten(0, 1).to(torch.int32)
    for level in (1, 2):
        n, w = lay.sizes[level], lay.widths[level]
        for det in (False, True):
            rowptr, idx = transpose_picks(sel, n, w, lay.sel_off[level], deterministic=det)
            assert (idx >= 0).all(), "unfilled slot in the key-major list"
            for b in range(sel.shape[0]):
                p = picks[level - 1].flatten(0, 1)[b].cpu()
                for u in range(n):
                    pos = idx[b, rowptr[b, u]:rowptr[b, u + 1]].cpu().long()
                    # each entry is a flat pick position: query pos // w, slot pos % w, which holds u
                    assert (p.flatten()[pos] == u).all(), (level, det, b, u)
                    got = pos // w
                    want = (p == u).any(-1).nonzero().flatten()
                    got = got if det else got.sort().values
                    assert torch.equal(got, want), (level, det, b, u)


def test_deterministic_gradients_are_bitwise_reproducible(device):
    torch.manual_seed(9)
    q, k, v = _inputs(300, 16, torch.float32, device)
    args = dict(block_size=16, topk=3, levels=2, enrich_levels=2, reweight=True, scale=0.25, deterministic=True)
    runs = []
    for _ in range(2):
        o = llsa_attention_triton(q, k, v, **args)
        runs.append(torch.autograd.grad(o.sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_public_api_routes_to_kernels(device):
    torch.manual_seed(2)
    q, k, v = (x.detach() for x in _inputs(64, 16, torch.float32, device))
    o = llsa_attention(q, k, v, topk=2, levels=1, backend="triton")
    ref = llsa_attention(q, k, v, topk=2, levels=1, backend="torch")
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)


def test_noncontiguous_inputs(device):
    torch.manual_seed(4)
    x = torch.randn(3, 1, 100, 2, 16, device=device)
    q, k, v = (x[i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    o = llsa_attention(q, k, v, topk=2, levels=1, backend="triton")
    ref = llsa_attention(q.contiguous(), k.contiguous(), v.contiguous(), topk=2, levels=1, backend="torch")
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad,match", [(dict(block_size=4), "power of two"), (dict(d=24), "head dim")])
def test_launcher_rejects_what_kernels_cannot_do(bad, match, device):
    q = torch.randn(1, 1, 64, bad.get("d", 16), device=device)
    with pytest.raises(ValueError, match=match):
        llsa_attention(q, q, q, block_size=bad.get("block_size", 16), backend="triton")


def test_torch_compile_traces_without_graph_breaks(device):
    """The custom ops keep the graph whole: fullgraph=True raises on any break."""
    torch.manual_seed(6)
    q, k, v = _inputs(64, 16, torch.float32, device)

    def f(q, k, v):
        return llsa_attention(q * 2, k, v, topk=2, levels=1, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_opcheck_on_transposed_inputs(device):
    """Fake (meta) kernels must give the real outputs' shapes and strides: a DiT hands in q, k, v as
    transposed views, and inductor asserts the strides the fake kernels promised."""
    from llsa.ops.llsa.interface import _attention_bwd, _attention_fwd

    torch.manual_seed(7)
    # [b, n, h, d] -> [b, h, n, d]: the layout of a DiT's heads
    q, k, v = (torch.randn(1, 80, 2, 16, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    args = (16, 2, 2, 2, True, 0.25, False)
    torch.library.opcheck(_attention_fwd, (q, k, v, *args))
    o, lse, pkv, sel = _attention_fwd(q, k, v, *args)
    do = torch.randn(1, 80, 2, 16, device=device).transpose(1, 2)
    # the backward op has no backward of its own (no double backward), so its autograd checks are skipped
    torch.library.opcheck(_attention_bwd, (do, q.detach(), k.detach(), v.detach(), o, lse, pkv, sel, *args),
                          test_utils=("test_schema", "test_faketensor"))


def test_every_ancestor_picks_one_coarse_token(device):
    """All eight level-2 ancestors pick level-2 token 5 (its keys align with every query), so the
    enriched candidates' reduction sums one key block's partials over every ancestor."""
    torch.manual_seed(12)
    n, d = 2048, 16
    q, k, v = (x.detach() for x in _inputs(n, d, torch.float32, device))
    direction = torch.randn(d, device=device)
    q = q + 3 * direction
    k[..., 5 * 256:6 * 256, :] += 3 * direction
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    picks = hierarchical_topk(q, k, block_size=16, topk=2, levels=3)[1]
    assert bool((picks == 5).any(-1).all()), "construction failed: not every ancestor picked token 5"
    _check(n, 16, 2, 3, 3, True, torch.float32, device, inputs=inputs)


@pytest.mark.parametrize("tiles", [
    dict(pool_rows=512, fwd_kpi=8, fwd_keys=16, fwd_top_keys=128, dq_kpi=8, dq_keys=16, dq_top_keys=128,
         cand_keys=128, cand_rows=128, kv_rows=256, top_keys=128),
    dict(pool_rows=64, fwd_rows=64, dq_rows=64, fwd_top_keys=16, dq_top_keys=16),
    dict(fwd_fused=False, dq_fused=False, shared_kpi=8, fine_keys=128)], ids=["wide", "narrow", "split"])
@pytest.mark.parametrize("case", [CASES[4], CASES[7], (200, 32, 2, 1, 1, True), (600, 16, 2, 1, 1, True)],
                         ids=["N700-L3", "N200-B32", "N200-B32-top", "N600-top38"])
def test_kernels_match_reference_at_the_other_swept_tile_shapes(case, tiles, device, monkeypatch):
    """tune_llsa may pick any tile shape it sweeps, and the query-owned pass may run fused or split; each
    must compute the same attention (N600-top38: 38 coarsest tokens, so one, two or three steps over them with
    a partial last one)."""
    from llsa.ops.llsa import tuning

    monkeypatch.setattr(tuning, "TUNE", {**tuning.TUNE, **tiles})
    torch.manual_seed(sum(case[:5]) + 1)
    _check(*case, torch.float32, device)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_int64_row_offsets_match_reference(fused, device, monkeypatch):
    """Heads of 2^31 elements or more take the kernels' int64 row offsets; every smaller one the int32 path,
    so the wide path runs here by lowering the threshold."""
    from llsa.ops.llsa import launch, tuning

    monkeypatch.setattr(launch, "INT32_SLAB", 0)
    monkeypatch.setattr(tuning, "TUNE", {**tuning.TUNE, "fwd_fused": fused, "dq_fused": fused})
    torch.manual_seed(11)
    _check(*CASES[4], torch.float32, device)


# N a multiple of B^L and pick counts that the loops' steps divide: the query-owned pass's unmasked EVEN path
EVEN_CASES = [(4096, 16, 4, 2, 2, True), (4096, 16, 4, 2, 1, False), (16384, 16, 4, 3, 2, True),
              (1024, 16, 4, 1, 1, True), (1024, 16, 4, 1, 0, True)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
@pytest.mark.parametrize("case", EVEN_CASES, ids=["L2", "L2-E1-rw0", "L3-E2", "L1", "L1-E0"])
def test_even_tiles_match_reference(case, fused, device, monkeypatch):
    """Where every loop's tiles are full, the kernels drop their masks and fold each tile's one weight into
    the exp2's offset; that path must compute the same attention (the other tests' N are off the B^L grid).
    L1: the coarsest level is the only shared segment; L1-E0: no shared segment, so only the split fine pass."""
    from llsa.ops.llsa import launch, tuning

    if not fused and case[3] == 3:
        pytest.skip("the split passes' even path is covered at L=2; L=3 adds a minute under the interpreter")
    if fused and case[4] == 0:
        pytest.skip("without shared segments the forward always runs the split fine pass (the split case)")
    monkeypatch.setattr(tuning, "TUNE", {**tuning.TUNE, "fwd_fused": fused, "dq_fused": fused})
    # what the launcher decides for each query-owned launch of the forward and the backward
    decided = _record(monkeypatch, launch, "even")
    torch.manual_seed(case[0] + case[4])
    _check_on_the_grid(case, device)
    assert len(decided) >= 2 and all(decided), decided


def test_even_path_needs_whole_tiles_and_a_positive_scale():
    """The launcher's EVEN test: off the B^L grid, with a step that leaves a partial tile, or a scale <= 0
    (whose largest logit is not the largest raw score's) the masked path runs."""
    from llsa.ops.llsa.tuning import even

    lay = Layout(4096, 16, 4, 2, 2)
    assert even(lay, 0.25, 128, [(4, 4), (16, 16)])
    assert not even(Layout(4000, 16, 4, 2, 2), 0.25, 128, [(4, 4)])
    assert not even(lay, 0.25, 128, [(4, 8)])
    assert not even(lay, 0.25, 96, [(4, 4)])
    assert not even(lay, -0.25, 128, [(4, 4)])
    assert not even(lay, 0.0, 128, [(4, 4)])


@pytest.mark.parametrize("case", [EVEN_CASES[0], CASES[4]], ids=["even-L2", "N700-L3"])
def test_picks_loaded_per_step_match_reference(case, device, monkeypatch):
    """Pick lists longer than ``hoist_picks`` are read one step at a time instead of loaded before their loop;
    that path (even and masked) must compute the same attention."""
    from llsa.ops.llsa import launch, tuning

    monkeypatch.setattr(tuning, "TUNE", {**tuning.TUNE, "hoist_picks": 0})
    # the fused pass takes its width through fused_shape, the split passes directly
    widths = _record(monkeypatch, tuning, "pick_width")
    monkeypatch.setattr(launch, "pick_width", tuning.pick_width)
    torch.manual_seed(case[0] + 3)
    _check_on_the_grid(case, device)
    assert widths and not any(widths), widths


def test_pick_width_covers_the_widest_list_up_to_the_cap():
    from llsa.ops.llsa.tuning import TUNE, pick_width

    t = {**TUNE, "hoist_picks": 32}
    assert pick_width(Layout(4096, 16, 4, 2, 2), t) == 4
    assert pick_width(Layout(65536, 16, 5, 2, 2), t) == 8
    assert pick_width(Layout(65536, 16, 32, 2, 2), t) == 32
    assert pick_width(Layout(65536, 16, 33, 2, 2), t) == 0
    # a level with fewer tokens than topk picks all of them: its list is that long
    assert pick_width(Layout(40, 16, 8, 2, 2), t) == 4


def test_wide_head_dim_shapes_override_known_keys_only():
    """A misspelt key in TUNE_WIDE would be silently ignored by the launchers, which read TUNE's keys."""
    from llsa.ops.llsa.tuning import TUNE, TUNE_WIDE

    assert set(TUNE_WIDE) <= set(TUNE)


def test_launch_shapes_apply_inside_the_block_only_and_refuse_unknown_keys():
    """The tools change launch shapes through ``launch_shapes``: the change reaches ``tune(d)`` of its head
    dim class only, and leaves nothing behind, even when the block raises."""
    from llsa.ops.llsa.tuning import TUNE, launch_shapes, tune

    before64, before128 = dict(tune(64)), dict(tune(128))
    with launch_shapes(128, fwd_kpi=8, kv_rows=32):
        assert tune(128)["fwd_kpi"] == 8 and tune(128)["kv_rows"] == 32 and tune(64) == before64
    with pytest.raises(ZeroDivisionError):
        with launch_shapes(64, pool_rows=64):
            assert tune(64)["pool_rows"] == 64 and tune(128)["pool_rows"] == 64
            1 / 0
    assert tune(64) == before64 and tune(128) == before128 and tune(64) is TUNE
    with pytest.raises(KeyError, match="fwd_kip"):
        with launch_shapes(64, fwd_kip=2):
            pass


def test_layout_tables_are_made_on_their_own_thread_and_errors_reach_the_caller():
    """The kernels' layout table is built on a worker thread (out of reach of reduce-overhead's graph
    pool); what the worker makes must be the table, and what it raises must surface in the caller."""
    from llsa.ops.llsa.launch import kernel_table

    lay = Layout(300, 16, 3, 2, 2)
    if torch.cuda.is_available():
        assert torch.equal(kernel_table(lay, torch.device("cuda")).cpu(), lay.meta("cpu"))
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            kernel_table(lay, torch.device("cuda"))
