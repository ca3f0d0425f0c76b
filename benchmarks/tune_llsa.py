"""Time the stages of the LLSA forward and sweep the kernels' launch shapes (``tuning.TUNE``).

``python -m benchmarks.tune_llsa --n 65536 262144 --levels 2`` prints per-stage medians (pooling, selection,
the query-owned pass) of CUDA-graph replays, which leave host time out. ``--sweep forward`` / ``--sweep
backward`` tries every setting of one group of ``TUNE`` keys at a time (each group keeping the best of the
groups before it), timing the whole forward or backward summed over the sizes; ``--write FILE`` saves the
best ``TUNE`` as JSON. B=2, bf16, H=4 and D=64 unless ``--heads`` / ``--dim`` say otherwise; above D=64 the
sweep sets and writes ``tuning.TUNE_WIDE``'s overrides instead (``--dim 128 --heads 16``).
Graph replay of small calls (``graphs.py``) is off here, so every setting really launches.
"""
import argparse
import itertools
import json

import torch
from triton.testing import do_bench, do_bench_cudagraph

from llsa.ops.common import LOG2E
from llsa.ops.llsa import graphs
from llsa.ops.llsa.interface import llsa_attention_triton
from llsa.ops.llsa.launch import QueryPass, launch_query_pass, pool_tuned, select_tuned
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.tuning import TUNE, TUNE_WIDE, launch_shapes, tune

# Groups of TUNE keys swept together, and the values tried.
GROUPS = {
    "forward": {
        "pool": dict(pool_rows=[64, 128, 256, 512], pool_warps=[2, 4, 8]),
        "select": dict(select_warps=[2, 4, 8], select_chunk=[16, 32]),
        # each loop's picks loaded before it, or one load per step
        "hoist": dict(hoist_picks=[0, 32]),
        # the fused pass against the split passes (at D=128: --dim 128)
        "gate": dict(fwd_fused=[True, False]),
        "fused": dict(fwd_rows=[64, 128], fwd_keys=[16, 32], fwd_warps=[4, 8], fwd_stages=[2, 3]),
        "fused_kpi": dict(fwd_kpi=[1, 2, 4, 8]),
        "fused_top": dict(fwd_top_keys=[32, 64, 128]),
        # a register cap, so that more programs share an SM, with tiles small enough to spill little under it
        # (benchmarks/inspect_llsa.py shows the spills of a shape without a GPU); slower at every measured shape
        "fused_regs": dict(fwd_maxnreg=[None, 168], fwd_kpi=[2, 4], fwd_keys=[16, 32]),
        # all three key tiles at once: smaller ones together free registers and shared memory for a third
        # program per SM at D=128 (150 registers and 48 KB at 16 / 32 / 32 keys)
        "fused_tiles": dict(fwd_keys=[16, 32], fwd_kpi=[2, 4], fwd_top_keys=[32, 64]),
    },
    "backward": {
        "gate": dict(dq_fused=[True, False]),
        # num_stages=1 for the fine dk/dv kernel hit an illegal memory access on an H100 (triton 3.6), which
        # poisons the CUDA context for every later setting, so it is not tried
        "kv": dict(kv_rows=[32, 64, 128, 256], kv_warps=[4, 8], kv_stages=[3, 2]),
        "dq": dict(dq_rows=[64, 128], dq_keys=[16, 32], dq_warps=[4, 8], dq_stages=[2, 3]),
        "dq_kpi": dict(dq_kpi=[1, 2, 4, 8]),
        "dq_top": dict(dq_top_keys=[32, 64, 128]),
        "dq_regs": dict(dq_maxnreg=[None, 168], dq_keys=[16, 32]),
        "dq_tiles": dict(dq_keys=[16, 32], dq_kpi=[2, 4], dq_top_keys=[32, 64]),
        "top": dict(top_keys=[64, 128], top_warps=[4, 8]),
        "top_programs": dict(top_programs=[512, 1024, 2048, 4096]),
        "cand": dict(cand_keys=[64, 128], cand_rows=[32, 64, 128], cand_warps=[4, 8]),
    },
}


def stage_times(ns, levels, heads=4, dim=64):
    for n in ns:
        lay = Layout(n, 16, 8, levels, levels)
        meta = lay.meta("cuda")
        q, k, v = (torch.randn(2 * heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        t = tune(dim)
        pkv = torch.empty(2, 2 * heads, lay.n_pool, dim, device="cuda", dtype=q.dtype)

        def pool():
            return pool_tuned(q, k, v, lay, t, kv_out=pkv)

        pooled = pool()
        sel = select_tuned(pooled, lay, t)
        o = torch.empty_like(q)
        lse = torch.empty(2 * heads, n, device="cuda")
        part = torch.empty(2 * heads, n, dim, device="cuda")
        plse = torch.empty_like(lse)
        # graph replays: eager timing adds host time, which hides the few microseconds selection's shapes
        # differ by
        t_pool = do_bench_cudagraph(pool, return_mode="median")
        t_sel = do_bench_cudagraph(lambda: select_tuned(pooled, lay, t), return_mode="median")
        forward = QueryPass(lay, meta, q, k, v, pkv, sel, lse, o, dim ** -0.5 * LOG2E, reweight=True, part=part,
                            plse=plse)
        t_q = do_bench_cudagraph(lambda: launch_query_pass(forward, t), return_mode="median")
        print(f"N={n} L={levels}: pool {t_pool:.3f} ms, select {t_sel:.3f} ms, query-owned pass {t_q:.3f} ms")


def sweep(direction: str, ns, levels, groups=None, heads=4, dim=64) -> dict:
    """Coordinate descent over ``GROUPS[direction]``; returns the best shapes found: all of TUNE, or at a head
    dim above 64 the TUNE_WIDE overrides. The library's own tables are left as they were."""
    best = dict(TUNE_WIDE if dim > 64 else TUNE)
    calls = []
    for n in ns:
        lv = levels if n < 262144 else max(levels, 3)
        kw = dict(block_size=16, topk=8, levels=lv, enrich_levels=lv, reweight=True, scale=dim ** -0.5)
        q, k, v = (torch.randn(2, heads, n, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        if direction == "forward":
            calls.append(lambda q=q, k=k, v=v, kw=kw: llsa_attention_triton(q, k, v, **kw))
        else:
            o = llsa_attention_triton(q, k, v, **kw)
            calls.append(lambda o=o, qkv=(q, k, v), do=do: torch.autograd.grad(o, qkv, do, retain_graph=True))

    def total(setting):
        # every setting really launches: a graph replay would time the shapes it was captured with
        with graphs.disabled(), launch_shapes(dim, **setting):
            return sum(do_bench(call, return_mode="median") for call in calls)

    print(f"start: {direction} {total(best):.3f} ms (summed over N={ns})")
    for group, space in GROUPS[direction].items():
        if groups and group not in groups:
            continue
        results = []
        for values in itertools.product(*space.values()):
            setting = dict(zip(space, values))
            try:
                results.append((total({**best, **setting}), setting))
            except Exception as e:
                # a device fault poisons the context for every later setting: stop there
                if type(e).__name__ == "AcceleratorError":
                    raise
                # resource limits for some shapes
                print(f"{group} {setting}: failed ({type(e).__name__})")
                continue
            print(f"{group} {setting}: {direction} {results[-1][0]:.3f} ms (summed over N={ns})")
        t, setting = min(results, key=lambda r: r[0])
        best.update(setting)
        print(f"best {group}: {setting} ({t:.3f} ms)")
    print(f"{'TUNE_WIDE' if dim > 64 else 'TUNE'} = {best}")
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--levels", type=int, default=2, help="levels below 262,144 tokens (3 from there)")
    p.add_argument("--sweep", choices=sorted(GROUPS), default=None, help="sweep this pass's launch shapes")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--groups", nargs="+", default=None, help="with --sweep: only these groups of GROUPS")
    p.add_argument("--write", default=None, help="with --sweep: save the best TUNE here (JSON)")
    args = p.parse_args(argv)
    unknown = set(args.groups or ()) - set(GROUPS.get(args.sweep, ()))
    if unknown:
        p.error(f"--groups {sorted(unknown)} are not groups of --sweep {args.sweep} "
                f"({sorted(GROUPS.get(args.sweep, {}))})")
    if args.sweep is None:
        stage_times(args.n, args.levels, args.heads, args.dim)
        return
    best = sweep(args.sweep, args.n, args.levels, args.groups, args.heads, args.dim)
    if args.write:
        with open(args.write, "w") as f:
            json.dump(best, f, indent=1)


if __name__ == "__main__":
    main()
