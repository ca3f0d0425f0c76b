"""CUDA-graph replay of the eager forward and backward for small problems, where launching is the cost.

An eager LLSA call makes 7 Triton launches forward and ~20 launches and torch ops backward; on an H100
host one Triton launch alone costs ~17 us, so at 4,096 tokens the eager forward spends ~0.43 ms and
the backward ~1.7 ms on the host against ~0.07 / 0.2 ms of kernels (docs/benchmarks.md). Up to
``GRAPH_MAX_ELEMENTS`` a call replays a captured graph instead, one of two kinds:

- **bound**: captured on the caller's own input tensors and on the output tensors allocated for this
  call, so a replay launches one graph and copies nothing. It is keyed by the addresses and strides of
  all of them, so it only replays where every input and output sits where it sat at capture; the
  caching allocator hands a loop that repeats the same work the same blocks, so benchmarks and steady
  training loops settle on it within a few calls. An address set is captured the second time it is seen.
- **copying**: one per (shapes, dtypes, arguments), on static buffers of its own: inputs are copied in
  and outputs copied out (~20 us of host time and a few us of GPU time per tensor group). It serves
  every call without a bound graph, such as first sightings.

Outputs are fresh allocations in both, so a caller may keep any result while later calls replay. The
cache keeps ``MAX_GRAPHS`` graphs, least recently used dropped first; once ``MAX_GRAPHS`` bound graphs
have been dropped, the working set of address sets outgrows the cache (a model with more same-shape
layers than that), and no more bound graphs are captured, so none is recaptured over and over.
A graph keeps the launch shapes (``tuning.TUNE``) it was captured with: ``tuning.launch_shapes`` clears them.
A shape whose capture fails runs eagerly from then on, with one warning. ``LLSA_CUDA_GRAPHS=0`` turns
graphs off (``disabled()`` for a block of code); ``clear()`` frees the graphs and their memory: each keeps
its temporaries (~3x q's size for a forward, ~6x for a backward), and a copying graph also its static
inputs and outputs.
"""
import contextlib
import os
import warnings
from collections import OrderedDict

import torch

# B*H*N*D of q at or below which a call is replayed from a graph (4,096 tokens at H=16, D=128).
GRAPH_MAX_ELEMENTS = 1 << 24
# Captured graphs kept, least recently used dropped first; each holds its own temporaries.
MAX_GRAPHS = 16
ENABLED = os.environ.get("LLSA_CUDA_GRAPHS", "1") != "0"

_graphs: OrderedDict = OrderedDict()
# Address sets seen once and not captured yet (bounded, least recently seen dropped).
_seen: OrderedDict = OrderedDict()
# Shapes whose capture failed: they run eagerly.
_failed: set = set()
_dropped_bound = 0


def usable(q: torch.Tensor) -> bool:
    """Whether a call on q should replay a graph: on CUDA, small, and not inside someone's capture."""
    return (ENABLED and q.is_cuda and q.numel() <= GRAPH_MAX_ELEMENTS
            and not torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def disabled():
    """Run the block without graph replay, so every call launches its kernels (as ``LLSA_CUDA_GRAPHS=0``)."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def clear() -> None:
    """Drop every captured graph (and the memory their buffers and temporaries hold)."""
    global _dropped_bound
    _graphs.clear()
    _seen.clear()
    _failed.clear()
    _dropped_bound = 0


def _capture(fn, tensors, args, out) -> torch.cuda.CUDAGraph:
    """Capture ``fn(*tensors, *args, out=out)`` after one eager run that compiles kernels and fills caches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*tensors, *args, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread-local: other threads' CUDA calls meanwhile (a DataLoader's pinning, NCCL's watchdog) must
    # neither fail nor break this capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn(*tensors, *args, out=out)
    return graph


class _Bound:
    """Reads the caller's inputs and writes the caller's outputs where they were at capture."""

    def __init__(self, fn, tensors, args, out):
        self.graph = _capture(fn, tensors, args, out)

    def __call__(self, tensors, out):
        self.graph.replay()


class _Copying:
    """Static inputs and outputs of its own: any tensors of the captured shapes go through copies."""

    def __init__(self, fn, tensors, args, out):
        self.inputs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        self.outputs = [torch.empty_like(t) for t in out]
        torch._foreach_copy_(self.inputs, list(tensors))
        self.graph = _capture(fn, self.inputs, args, self.outputs)

    def __call__(self, tensors, out):
        torch._foreach_copy_(self.inputs, list(tensors))
        self.graph.replay()
        torch._foreach_copy_(list(out), self.outputs)


def _device(device: torch.device):
    # capture and replay on the tensors' device, whichever device is current (switching costs ~5 us)
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _store(key, graph) -> None:
    global _dropped_bound
    if len(_graphs) >= MAX_GRAPHS:
        _, old = _graphs.popitem(last=False)
        _dropped_bound += isinstance(old, _Bound)
    _graphs[key] = graph


def _make(kind, key, fn, tensors, args, out):
    """A new graph of ``kind``, cached under ``key``; None if capture fails."""
    try:
        graph = kind(fn, tensors, args, out)
    except RuntimeError as err:
        warnings.warn(f"llsa: capturing a CUDA graph failed ({type(err).__name__}: {err}); "
                      "these shapes run eagerly", RuntimeWarning, stacklevel=4)
        return None
    _store(key, graph)
    return graph


def replay(fn, tensors: tuple, args: tuple, alloc) -> tuple:
    """``fn(*tensors, *args, out=out)`` from a captured graph, with ``out = alloc(*tensors, *args)`` fresh.

    ``fn`` writes every element of the tensors in ``out`` and nothing else outside its own temporaries.
    """
    out = alloc(*tensors, *args)
    # buffers made under inference mode cannot be written outside it (Lightning validates in that mode)
    bound = [fn, args, torch.is_inference_mode_enabled()]
    for t in tensors:
        bound += (t.data_ptr(), t.dtype, t.shape, t.stride())
    # one flat tuple: hashing it is the cost of every call (~5 us), so no nesting
    bound = tuple(bound + [t.data_ptr() for t in out])
    with _device(tensors[0].device):
        graph = _graphs.get(bound)
        if graph is not None:
            _graphs.move_to_end(bound)
        else:
            graph = _miss(bound, fn, tensors, args, out)
        if graph is None:
            fn(*tensors, *args, out=out)
        else:
            graph(tensors, out)
    return out


def _miss(bound, fn, tensors, args, out):
    """The graph for an address set without a bound graph: a new bound one if the set was seen before,
    else the shape's copying graph; None where capture failed for these shapes."""
    key = (fn, args, tensors[0].device, bound[2], *((t.shape, t.dtype) for t in tensors))
    if key in _failed:
        return None
    if bound in _seen and _dropped_bound < MAX_GRAPHS:
        del _seen[bound]
        graph = _make(_Bound, bound, fn, tensors, args, out)
    else:
        _seen[bound] = None
        if len(_seen) > 4 * MAX_GRAPHS:
            _seen.popitem(last=False)
        graph = _graphs.get(key)
        if graph is not None:
            _graphs.move_to_end(key)
        else:
            graph = _make(_Copying, key, fn, tensors, args, out)
    if graph is None:
        _failed.add(key)
    return graph
