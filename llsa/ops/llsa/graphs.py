"""CUDA-graph replay of the eager forward and backward for small problems, where launching is the cost.

An eager LLSA call makes 5-7 Triton launches forward and ~12 backward; with Python around each that is
0.5 ms forward and 2 ms backward on the host at 4,096 tokens, against ~0.07 / 0.3 ms of kernels
(docs/benchmarks.md). Up to ``GRAPH_MAX_ELEMENTS`` each distinct (shapes, dtypes, arguments) is
captured once into a CUDA graph with static input buffers: a call copies its inputs in, replays, and
copies the outputs out: one graph launch and a few copies. Larger problems run eagerly, where the
GPU time hides the host's and the copies would only add. A shape whose capture fails runs eagerly from
then on, with one warning. ``LLSA_CUDA_GRAPHS=0`` turns graphs off;
``clear()`` frees the captured graphs and their memory: each keeps static copies of its inputs and
outputs and its own temporaries, roughly 6x q's size for a forward and 12x for a backward.
"""
import os
import warnings
from collections import OrderedDict

import torch

# B*H*N*D of q at or below which a call is replayed from a graph (4,096 tokens at H=16, D=128).
GRAPH_MAX_ELEMENTS = 1 << 24
# Captured graphs kept, least recently used dropped first; each holds its own temporaries.
MAX_GRAPHS = 8
ENABLED = os.environ.get("LLSA_CUDA_GRAPHS", "1") != "0"

_graphs: OrderedDict = OrderedDict()
# Cached in place of a graph for shapes whose capture failed: they run eagerly.
_EAGER = object()


def usable(q: torch.Tensor) -> bool:
    """Whether a call on q should replay a graph: on CUDA, small, and not inside someone's capture."""
    return (ENABLED and q.is_cuda and q.numel() <= GRAPH_MAX_ELEMENTS
            and not torch.cuda.is_current_stream_capturing())


def clear() -> None:
    """Drop every captured graph (and the memory their static buffers and temporaries hold)."""
    _graphs.clear()


class _Captured:
    def __init__(self, fn, tensors, args):
        self.inputs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        torch._foreach_copy_(self.inputs, list(tensors))
        # one eager run on a side stream first: kernels compile and caches fill outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs, *args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: other threads' CUDA calls meanwhile (a DataLoader's pinning, NCCL's watchdog) must
        # neither fail nor break this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs, *args)

    def __call__(self, tensors):
        torch._foreach_copy_(self.inputs, list(tensors))
        self.graph.replay()
        # the next replay overwrites the static outputs, so the caller gets copies
        outs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in self.outputs]
        torch._foreach_copy_(outs, list(self.outputs))
        return tuple(outs)


def replay(fn, tensors: tuple, args: tuple) -> tuple:
    """``fn(*tensors, *args)`` (which returns a tuple of tensors) from the graph captured for these shapes."""
    # buffers made under inference mode cannot be written outside it (Lightning validates in that mode)
    key = (fn, args, tensors[0].device, torch.is_inference_mode_enabled())
    key += tuple((t.shape, t.dtype) for t in tensors)
    graph = _graphs.pop(key, None)
    # capture and replay on the tensors' device, whichever device is current
    with torch.cuda.device(tensors[0].device):
        if graph is None:
            try:
                graph = _Captured(fn, tensors, args)
            except RuntimeError as err:
                warnings.warn(f"llsa: capturing a CUDA graph failed ({type(err).__name__}: {err}); "
                              "these shapes run eagerly", RuntimeWarning, stacklevel=3)
                graph = _EAGER
            if len(_graphs) >= MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs[key] = graph
        if graph is _EAGER:
            return fn(*tensors, *args)
        return graph(tensors)
