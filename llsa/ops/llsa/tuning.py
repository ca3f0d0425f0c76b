"""Launch shapes of the LLSA kernels: the tuned tables and the rules that turn them into tile constexprs.

``benchmarks/tune_llsa.py`` sweeps the tables (through :func:`launch_shapes`); ``benchmarks/inspect_llsa.py``
compiles the kernels with :func:`fused_shape`'s tiles. Every rule here is a pure function of the layout and
the table, so the launchers (``launch.py``) and the tools agree on what a launch looks like.
"""
import contextlib

import triton

from llsa.ops.llsa import graphs
from llsa.ops.llsa.layout import Layout

# head dims the kernels take
HEAD_DIMS = (16, 32, 64, 128)
# Launch shapes, measured on an H100 (docs/benchmarks.md); benchmarks/tune_llsa.py sweeps them. pool_*: input
# rows per pooling program, warps; select_*: warps per selection program below the coarsest level, channels
# per scoring product; fwd_* and dq_*: the fused query-owned pass of the forward and of dq (query rows, shared
# key tile in 16-key blocks, fine keys per step, coarsest-level keys per step, warps, stages, and a register
# cap per thread, so that more programs fit an SM, or None); hoist_picks: pick lists up to this long are
# loaded whole before the query-owned loops over them (``pick_width``);
# ``*_fused=False`` runs the split passes instead, whose shapes are shared_* and fine_* (fine_keys: keys per
# tile of the fine segment); cand_*: the enriched candidates' dk/dv (keys per tile, query rows per step,
# warps); kv_*: the fine keys' dk/dv; top_*: the coarsest level's dk/dv (top_programs: how many programs to
# split the queries into chunks for; their partials are then summed).
TUNE = dict(pool_rows=256, pool_warps=2, select_warps=2, select_chunk=32,
            fwd_fused=True, fwd_rows=64, fwd_kpi=4, fwd_keys=16, fwd_top_keys=64, fwd_warps=4, fwd_stages=3,
            fwd_maxnreg=None,
            dq_fused=True, dq_rows=64, dq_kpi=2, dq_keys=16, dq_top_keys=32, dq_warps=4, dq_stages=3,
            dq_maxnreg=None, hoist_picks=32,
            shared_kpi=4, shared_warps=4, shared_stages=2, fine_keys=64, fine_warps=4, fine_stages=2,
            cand_keys=64, cand_rows=64, cand_warps=4, kv_rows=128, kv_warps=4, kv_stages=2, top_keys=64,
            top_warps=4, top_programs=512)
# Overrides of TUNE above head dim 64, measured at D=128 (``tune_llsa --dim 128``): tiles of the same row
# count hold twice the bytes there, so the fastest shapes differ (more pooling warps, selection on more warps
# with narrower products, 32-key shared steps in the fused forward, fewer rows in the split and dk/dv passes).
TUNE_WIDE = dict(pool_warps=4, select_warps=4, select_chunk=16, fwd_kpi=2, shared_kpi=2, fine_keys=32, kv_rows=64,
                 cand_rows=32)


# Below this many elements in one head's (N, D) slab the query-owned kernels address rows with int32 offsets
# (one wide multiply-add per address instead of 64-bit arithmetic); from there on with int64 ones.
INT32_SLAB = 1 << 31


def tune(d: int) -> dict:
    """The launch shapes for head dim ``d``."""
    return {**TUNE, **TUNE_WIDE} if d > 64 else TUNE


@contextlib.contextmanager
def launch_shapes(d: int, **changes):
    """Run the block with ``changes`` to the launch shapes of head dim ``d`` (``TUNE``, or ``TUNE_WIDE``'s
    overrides above 64), restored afterwards. Captured CUDA graphs keep the shapes they were captured with,
    so they are dropped on the way in and out."""
    target = TUNE_WIDE if d > 64 else TUNE
    unknown = set(changes) - set(TUNE)
    if unknown:
        raise KeyError(f"unknown launch shapes {sorted(unknown)}; the keys are those of TUNE")
    saved = dict(target)
    graphs.clear()
    target.update(changes)
    try:
        yield target
    finally:
        target.clear()
        target.update(saved)
        graphs.clear()


def shared_rows(block: int) -> int:
    """Queries per program for the shared segments: one tile stays under one level-2 ancestor."""
    return min(128, block * block)


def top_keys(lay: Layout, keys: int) -> int:
    """Keys per step over the coarsest level: ``keys``, or fewer where the level has fewer tokens."""
    return max(16, min(keys, triton.next_power_of_2(lay.sizes[lay.levels])))


def fused_shape(lay: Layout, t: dict, pre: str) -> dict:
    """Tile constexprs and launch options of the fused query-owned pass (``pre``: "fwd_" or "dq_")."""
    block = lay.block
    return dict(BM=max(block, min(t[pre + "rows"], shared_rows(block))), KPI=max(1, t[pre + "kpi"] * 16 // block),
                FKPI=max(1, t[pre + "keys"] // block), BT=top_keys(lay, t[pre + "top_keys"]),
                KW=pick_width(lay, t),
                num_warps=t[pre + "warps"], num_stages=t[pre + "stages"], maxnreg=t[pre + "maxnreg"])


def pick_width(lay: Layout, t: dict) -> int:
    """The query-owned kernel's ``KW``: each loop over picks loads them all before it starts (a power of two
    >= the widest list) where the lists are at most ``hoist_picks`` long, else 0 (one load per step)."""
    width = triton.next_power_of_2(max(lay.widths[1:]))
    return width if width <= t["hoist_picks"] else 0


def even(lay: Layout, qk_scale: float, rows: int, steps: list[tuple[int, int]]) -> bool:
    """Whether a query-owned launch may take the kernel's ``EVEN`` path (unmasked key loops, one weight per
    tile): N a multiple of B^L, so every token of every level covers its whole span and every candidate
    exists, and of the ``rows`` queries per program; each loop's ``(count, step)`` dividing evenly; and a
    positive scale, because that path takes a tile's largest logit from its largest raw score."""
    return (qk_scale > 0 and lay.n % lay.spans[lay.levels] == 0 and lay.n % rows == 0
            and all(count % step == 0 for count, step in steps))


def shared_steps(lay: Layout, kpi: int, bt: int) -> list[tuple[int, int]]:
    """(count, step) of the shared loops: each enriched level's picks in ``kpi`` blocks, the coarsest level in
    ``bt`` tokens."""
    steps = [(lay.widths[lv + 1], kpi) for lv in range(1, lay.n_seg)]
    return steps + [(lay.sizes[lay.levels], bt)] if lay.top else steps


def fused_steps(lay: Layout, shape: dict) -> list[tuple[int, int]]:
    """(count, step) of every loop of the fused pass with tile constexprs ``shape`` (``fused_shape``'s): the
    shared loops, then the fine segment's picks in ``FKPI`` blocks."""
    return shared_steps(lay, shape["KPI"], shape["BT"]) + [(lay.widths[1], shape["FKPI"])]


def fused(lay: Layout, t: dict, pre: str) -> bool:
    """Whether the forward (``pre="fwd_"``) or dq (``"dq_"``) runs the fused query-owned pass with the shapes
    ``t`` (it needs shared segments to fuse with)."""
    return lay.shared and t[pre + "fused"]


def top_chunks(n: int, key_programs: int, programs: int) -> int:
    """Query chunks for the coarsest dk/dv: about ``programs`` programs, chunks of >= 256 queries."""
    return max(1, min(triton.cdiv(n, 256), triton.cdiv(programs, key_programs)))
