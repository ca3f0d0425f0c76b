"""The graph cache of llsa.ops.llsa.graphs: one capture per (function, arguments, shapes, dtypes), least
recently used dropped first. Capturing needs CUDA, so a stand-in records what would be captured; the
GPU suite checks real replays against eager launches."""
import contextlib

import pytest
import torch

from llsa.ops.llsa import graphs


class _FakeCapture:
    made = []

    def __init__(self, fn, tensors, args):
        self.fn, self.args = fn, args
        _FakeCapture.made.append((fn.__name__, tuple(t.shape for t in tensors), args))

    def __call__(self, tensors):
        return self.fn(*tensors, *self.args)


@pytest.fixture
def fake_graphs(monkeypatch):
    _FakeCapture.made = []
    monkeypatch.setattr(graphs, "_Captured", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    graphs.clear()
    yield _FakeCapture.made
    graphs.clear()


def _scaled(x, y, factor):
    return (x * factor + y,)


def test_one_capture_per_shape_and_arguments_least_recent_dropped(fake_graphs):
    a, b, c = torch.ones(2, 3), torch.ones(4, 3), torch.ones(5, 3)
    (out,) = graphs.replay(_scaled, (a, a), (2.0,))
    assert torch.equal(out, torch.full((2, 3), 3.0))
    graphs.replay(_scaled, (a * 2, a), (2.0,))
    assert len(fake_graphs) == 1, "same shapes and arguments must reuse the capture"
    graphs.replay(_scaled, (a, a), (3.0,))
    assert len(fake_graphs) == 2, "other arguments need their own capture"
    graphs.replay(_scaled, (a, a), (2.0,))
    graphs.replay(_scaled, (b, b), (2.0,))
    # the cache holds two: (a, 3.0) was least recently used and went
    assert len(graphs._graphs) == 2 and len(fake_graphs) == 3
    graphs.replay(_scaled, (a, a), (2.0,))
    assert len(fake_graphs) == 3
    graphs.replay(_scaled, (a, a), (3.0,))
    assert len(fake_graphs) == 4
    graphs.replay(_scaled, (c.half(), c.half()), (2.0,))
    assert fake_graphs[-1] == ("_scaled", ((5, 3), (5, 3)), (2.0,))


def test_inference_mode_gets_its_own_capture(fake_graphs):
    """Static buffers made under inference mode can't be written outside it, so the modes never share."""
    a = torch.ones(2, 3)
    graphs.replay(_scaled, (a, a), (2.0,))
    with torch.inference_mode():
        graphs.replay(_scaled, (a, a), (2.0,))
    assert len(fake_graphs) == 2


def test_a_failed_capture_warns_once_and_runs_those_shapes_eagerly(fake_graphs, monkeypatch):
    attempts = []

    class _Failing:
        def __init__(self, fn, tensors, args):
            attempts.append(fn)
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_Captured", _Failing)
    a = torch.ones(2, 3)
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        (out,) = graphs.replay(_scaled, (a, a), (2.0,))
    assert torch.equal(out, torch.full((2, 3), 3.0))
    (out,) = graphs.replay(_scaled, (a, a * 2), (2.0,))
    assert torch.equal(out, torch.full((2, 3), 4.0))
    assert len(attempts) == 1, "a shape whose capture failed must not be captured again"


def test_graphs_are_only_for_small_cuda_tensors_outside_a_capture():
    assert not graphs.usable(torch.ones(4, 4)), "CPU tensors never replay graphs"
