"""LLSA kernels on the GPU in bf16/fp16, judged by the flash-attention rule.

The kernel's error against a float32 reference may be at most twice the error that the plain-PyTorch
reference makes in the same low precision, plus a small floor. Outputs are poisoned with NaN by the
launchers, so an unwritten element fails.
"""
import pytest
import torch

from llsa.ops.llsa.interface import hierarchical_topk_triton, llsa_attention_triton
from llsa.ops.llsa.levels import default_levels
from llsa.ops.llsa.naive import llsa_attention_torch
from llsa.testing import flash_rule_failure

pytestmark = pytest.mark.gpu

SIZES = [17, 1000, 4096, 16384, 65536, 262144]


def _run(n, d, dtype, scale, levels=None, shape=(1, 2)):
    torch.manual_seed(n + d)
    block, topk = 16, 8
    levels = levels or default_levels(n, block)
    args = dict(block_size=block, topk=topk, levels=levels, enrich_levels=levels, reweight=True, scale=d ** -0.5)
    q, k, v = ((torch.randn(*shape, n, d, device="cuda") * scale).to(dtype).requires_grad_() for _ in range(3))
    # both references use the kernel's picks, so all three attend the same key set
    sel = hierarchical_topk_triton(q.detach(), k.detach(), block_size=block, topk=topk, levels=levels)
    o = llsa_attention_triton(q, k, v, **args)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = llsa_attention_torch(q32, k32, v32, sel=sel, **args)
    g_ref = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    low = llsa_attention_torch(ql, kl, vl, sel=sel, **args)
    g_low = torch.autograd.grad(low, (ql, kl, vl), do)
    failures = []
    for name, a, r, lo in [("o", o, ref, low)] + list(zip(("dq", "dk", "dv"), g, g_ref, g_low)):
        assert not torch.isnan(a).any(), f"{name}: unwritten or NaN elements"
        failures.append(flash_rule_failure(name, a, r, lo))
    return [f for f in failures if f is not None]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flash_rule_across_lengths(n, dtype):
    shape = (1, 1) if n >= 65536 else (2, 2)
    failures = _run(n, 64, dtype, 1.0, shape=shape)
    assert not failures, f"N={n} {dtype}: {failures}"


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_flash_rule_head_dims_and_scales(d, scale):
    failures = _run(4096, d, torch.bfloat16, scale, levels=2)
    assert not failures, f"D={d} scale={scale}: {failures}"


def test_fp32_selection_matches_reference():
    from llsa.ops.llsa.naive import hierarchical_topk

    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 65536, 64, device="cuda"), torch.randn(2, 2, 65536, 64, device="cuda")
    got = hierarchical_topk_triton(q, k, block_size=16, topk=8, levels=3)
    want = hierarchical_topk(q, k, block_size=16, topk=8, levels=3)
    for g, w in zip(got, want):
        # fp32 dot products in another order may swap a near-tie; demand agreement on all but a sliver
        assert (g == w).float().mean().item() > 0.999


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_forward_and_backward_replay_from_a_cuda_graph(deterministic):
    """No host sync inside the op: a captured forward+backward, replayed on new inputs, gives the eager
    results (benchmarks time the GPU this way, `run.py bench --cudagraph`)."""
    n, d, block = 4096, 64, 16
    args = dict(block_size=block, topk=8, levels=2, enrich_levels=2, reweight=True, scale=d ** -0.5,
                deterministic=deterministic)
    q, k, v, do = (torch.randn(2, 2, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        o = llsa_attention_triton(q, k, v, **args)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for x in (q, k, v, do):
                x.copy_(torch.randn_like(x))
        graph.replay()
        eager = step()
        for name, a, b in zip(("o", "dq", "dk", "dv"), captured, eager):
            if deterministic:
                assert torch.equal(a, b), name
            else:
                # atomics order the key-major lists differently from run to run: equal up to the
                # order of fp32 sums, i.e. about one bf16 rounding step
                torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_dit_matches_eager(mode):
    """torch.compile (inductor; reduce-overhead adds CUDA graphs) of a DiT with the LLSA kernels: same
    loss and gradients as eager, on the third call (the graphed one under reduce-overhead)."""
    from llsa.models import build_dit
    from llsa.ops.llsa import launch

    torch.manual_seed(0)
    eager = build_dit("DiT-T", image_size=64, in_channels=1, patch_size=1, attention="llsa").cuda()
    compiled = build_dit("DiT-T", image_size=64, in_channels=1, patch_size=1, attention="llsa").cuda()
    with torch.no_grad():
        # off the adaLN-zero init, where the blocks' outputs and most gradients are exactly zero
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(mode=mode)
    x, t = torch.randn(2, 1, 64, 64, device="cuda"), torch.rand(2, device="cuda") * 1000
    losses = []
    for model, calls in ((eager, 1), (compiled, 3)):
        # the compiled model meets these shapes first, as in a fresh process: reduce-overhead's warm-up
        # must not keep the kernels' layout table in its graph pool
        launch.clear_layouts()
        for _ in range(calls):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, t).float().square().mean()
            loss.backward()
        losses.append(loss.detach().clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-3, rtol=1e-2)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        # bf16 autocast: compiled fusions round differently; compare against the gradient's size
        err = (a.grad - b.grad).abs().max().item()
        assert err <= 5e-2 * a.grad.abs().max().item() + 1e-6, name


def test_small_calls_replay_graphs_bitwise_like_eager_launches(monkeypatch):
    """Small problems replay a captured graph (graphs.py). Two calls in a row on different inputs of one
    shape share the graph: the first call's output and saved tensors must survive the second replay,
    and every result must equal the eager launches bit for bit (deterministic lists)."""
    from llsa.ops.llsa import graphs

    n, d = 1000, 64
    args = dict(block_size=16, topk=8, levels=2, enrich_levels=2, reweight=True, scale=d ** -0.5,
                deterministic=True)
    torch.manual_seed(3)
    # [b, n, h, d] views, as a model hands them in
    inputs = [[torch.randn(2, n, 3, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3)] for _ in range(2)]
    dos = [torch.randn(2, 3, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def run():
        outs = [llsa_attention_triton(*qkv, **args) for qkv in inputs]
        loss = sum((o.float() * do.float()).sum() for o, do in zip(outs, dos))
        grads = torch.autograd.grad(loss, [x for qkv in inputs for x in qkv])
        return [o.detach() for o in outs] + list(grads)

    graphs.clear()
    replayed = run()
    assert len(graphs._graphs) == 2, "expected one forward and one backward graph for the shared shape"
    monkeypatch.setattr(graphs, "ENABLED", False)
    eager = run()
    assert not torch.equal(replayed[0], replayed[1])
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)


def test_a_loop_on_the_same_buffers_replays_bound_graphs_bitwise_like_eager(monkeypatch):
    """A benchmark or training loop: the same input buffers every call, rewritten in place, results
    dropped in between. Once the allocator's pattern settles the graphs are bound to the buffers (no
    copies) and nothing more is captured; every step must equal the eager launches bit for bit."""
    from llsa.ops.llsa import graphs

    n, d = 1000, 64
    args = dict(block_size=16, topk=8, levels=2, enrich_levels=2, reweight=True, scale=d ** -0.5,
                deterministic=True)
    q, k, v, do = (torch.empty(2, 3, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    made = []
    make = graphs._make
    monkeypatch.setattr(graphs, "_make", lambda kind, *a: made.append(kind.__name__) or make(kind, *a))

    def run(steps):
        gen = torch.Generator(device="cuda").manual_seed(5)
        results, captures = [], []
        for _ in range(steps):
            with torch.no_grad():
                for x in (q, k, v, do):
                    x.normal_(generator=gen)
            o = llsa_attention_triton(q, k, v, **args)
            grads = torch.autograd.grad(o, (q, k, v), do)
            # to the host, so no device allocation disturbs the loop's own
            results.append([t.cpu() for t in (o, *grads)])
            captures.append(len(made))
            del o, grads
        return results, captures

    graphs.clear()
    replayed, captures = run(6)
    # the first captures allocate static buffers, which can move the next steps' blocks once or twice
    assert made == ["_Copying", "_Copying", "_Bound", "_Bound"], made
    assert captures[-3:] == [4, 4, 4], f"captures after each step: {captures}"
    monkeypatch.setattr(graphs, "ENABLED", False)
    eager, _ = run(6)
    for step_a, step_b in zip(replayed, eager):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)


def test_clear_layouts_also_drops_the_graphs_that_read_the_tables():
    """A captured graph reads the layout table at its capture-time address: freeing the tables must drop the
    graphs too, or a later replay reads freed memory (the illegal access that clearing only the tables gave)."""
    from llsa.ops.llsa import graphs, launch

    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = dict(block_size=16, topk=8, levels=2, enrich_levels=2, reweight=True, scale=0.125)
    first = [llsa_attention_triton(q, k, v, **args) for _ in range(3)][-1]
    assert graphs._graphs, "small calls should have captured a graph"
    launch.clear_layouts()
    assert not graphs._graphs and not launch._layouts
    # the freed tables' memory is handed out again and overwritten
    junk = torch.full((1 << 20,), -1, dtype=torch.int64, device="cuda")
    again = llsa_attention_triton(q, k, v, **args)
    assert torch.equal(first, again)
    del junk
