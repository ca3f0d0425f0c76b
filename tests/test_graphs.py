"""The graph cache of llsa.ops.llsa.graphs: which calls capture which kind of graph, and what the cache
keeps. Capturing needs CUDA, so stand-ins record what would be captured and run the function eagerly;
the GPU suite checks real replays against eager launches."""
import contextlib

import pytest
import torch

from llsa.ops.llsa import graphs


class _Fake:
    made = []
    kind = ""

    def __init__(self, fn, tensors, args, out):
        self.fn, self.args = fn, args
        _Fake.made.append((self.kind, tuple(t.shape for t in tensors), args))

    def __call__(self, tensors, out):
        self.fn(*tensors, *self.args, out=out)


class _FakeBound(_Fake):
    kind = "bound"


class _FakeCopying(_Fake):
    kind = "copying"


@pytest.fixture
def made(monkeypatch):
    _Fake.made = []
    monkeypatch.setattr(graphs, "_Bound", _FakeBound)
    monkeypatch.setattr(graphs, "_Copying", _FakeCopying)
    monkeypatch.setattr(graphs, "_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    graphs.clear()
    yield _Fake.made
    graphs.clear()


def _scaled(x, y, factor, out):
    out[0].copy_(x * factor + y)


def _fresh(x, y, factor):
    return (torch.empty_like(x),)


def _fixed(out):
    """An allocator that returns the same output tensor every call, as the caching allocator does for a loop."""
    return lambda x, y, factor: out


def test_first_sightings_share_one_copying_graph_per_shape_and_arguments(made):
    a, b = torch.ones(2, 3), torch.ones(4, 3)
    # results are kept, so every call's output sits at a new address: no address set repeats
    kept = [graphs.replay(_scaled, (a, a), (2.0,), _fresh)]
    assert torch.equal(kept[0][0], torch.full((2, 3), 3.0))
    kept.append(graphs.replay(_scaled, (a * 2, a), (2.0,), _fresh))
    assert torch.equal(kept[-1][0], torch.full((2, 3), 5.0))
    assert made == [("copying", ((2, 3), (2, 3)), (2.0,))], "same shapes and arguments reuse the capture"
    kept.append(graphs.replay(_scaled, (a, a), (3.0,), _fresh))
    kept.append(graphs.replay(_scaled, (a, a), (2.0,), _fresh))
    kept.append(graphs.replay(_scaled, (b, b), (2.0,), _fresh))
    # the cache holds two: (a, 3.0) was least recently used and went
    assert len(graphs._graphs) == 2 and len(made) == 3
    kept.append(graphs.replay(_scaled, (a, a), (2.0,), _fresh))
    assert len(made) == 3
    kept.append(graphs.replay(_scaled, (a, a), (3.0,), _fresh))
    assert len(made) == 4 and {m[0] for m in made} == {"copying"}


def test_an_address_set_seen_twice_gets_a_bound_graph_and_then_only_replays(made):
    x, y, out = torch.ones(2, 3), torch.ones(2, 3), (torch.empty(2, 3),)
    for step in range(5):
        # the caller rewrites its buffers in place between calls, as a benchmark or training loop does
        x.fill_(step)
        (o,) = graphs.replay(_scaled, (x, y), (2.0,), _fixed(out))
        assert torch.equal(o, torch.full((2, 3), 2.0 * step + 1))
    assert [m[0] for m in made] == ["copying", "bound"]
    # other output addresses are another address set: back to the copying graph, no new capture
    (o,) = graphs.replay(_scaled, (x, y), (2.0,), _fresh)
    assert torch.equal(o, torch.full((2, 3), 9.0)) and len(made) == 2


def test_bound_graphs_stop_once_the_address_sets_outgrow_the_cache(made):
    """Three address sets in turn through a cache of two: every bound graph would be dropped before its
    set came round again. After MAX_GRAPHS drops no more are captured, so nothing is recaptured forever."""
    y = torch.ones(2, 3)
    sets = [(torch.full((2, 3), float(i)), (torch.empty(2, 3),)) for i in range(3)]
    for _ in range(8):
        for i, (x, out) in enumerate(sets):
            (o,) = graphs.replay(_scaled, (x, y), (2.0,), _fixed(out))
            assert torch.equal(o, torch.full((2, 3), 2.0 * i + 1))
    bound = [m for m in made if m[0] == "bound"]
    assert graphs._dropped_bound >= graphs.MAX_GRAPHS
    assert len(bound) <= graphs.MAX_GRAPHS + 2, f"bound graphs kept being recaptured: {len(bound)}"
    before = len(made)
    for x, out in sets:
        graphs.replay(_scaled, (x, y), (2.0,), _fixed(out))
    assert len(made) <= before + 1, "a settled cache should at most recapture the copying graph"


def test_inference_mode_gets_its_own_capture(made):
    """Buffers made under inference mode can't be written outside it, so the modes never share a graph."""
    a = torch.ones(2, 3)
    kept = [graphs.replay(_scaled, (a, a), (2.0,), _fresh)]
    with torch.inference_mode():
        kept.append(graphs.replay(_scaled, (a, a), (2.0,), _fresh))
    assert len(made) == 2


def test_a_failed_capture_warns_once_and_runs_those_shapes_eagerly(made, monkeypatch):
    attempts = []

    class _Failing:
        def __init__(self, fn, tensors, args, out):
            attempts.append(fn)
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_Copying", _Failing)
    monkeypatch.setattr(graphs, "_Bound", _Failing)
    x, y, out = torch.ones(2, 3), torch.ones(2, 3), (torch.empty(2, 3),)
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        (o,) = graphs.replay(_scaled, (x, y), (2.0,), _fixed(out))
    assert torch.equal(o, torch.full((2, 3), 3.0))
    for _ in range(3):
        (o,) = graphs.replay(_scaled, (x * 2, y), (2.0,), _fixed(out))
        assert torch.equal(o, torch.full((2, 3), 5.0))
    assert len(attempts) == 1, "a shape whose capture failed must not be captured again"


def test_graphs_are_only_for_small_cuda_tensors_outside_a_capture():
    assert not graphs.usable(torch.ones(4, 4)), "CPU tensors never replay graphs"
