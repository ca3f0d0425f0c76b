"""Time the stages of the LLSA forward separately and sweep the kernels' launch shapes.

``python -m ablations.tune_llsa --n 65536 262144 --levels 2``: prints per-stage medians (pooling,
selection, shared pass, fine pass) for each setting of ``llsa.ops.llsa.interface.TUNE`` tried.
``--backward``: sweeps the backward's kernels instead, one group of ``TUNE`` keys at a time (each group
keeps the best of the previous), timing the whole backward summed over the sizes; ``--write FILE`` saves
the best ``TUNE`` as JSON.
"""
import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from llsa.ops.llsa import interface as itf
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.pool import pool_qkv
from llsa.ops.llsa.select import select


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="try every launch shape, not just the current TUNE")
    p.add_argument("--backward", action="store_true", help="sweep the backward kernels' launch shapes")
    p.add_argument("--write", default=None, help="with --backward: save the best TUNE here (JSON)")
    args = p.parse_args(argv)
    if args.backward:
        best = sweep_backward(args.n, args.levels)
        if args.write:
            with open(args.write, "w") as f:
                json.dump(best, f, indent=1)
        return
    for n in args.n:
        lay = Layout(n, 16, 8, args.levels, args.levels)
        meta = lay.meta("cuda")
        q, k, v = (torch.randn(8, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pooled = pool_qkv(q, k, v, lay)
        sel = select(pooled, lay)
        pkv = pooled[1:].to(q.dtype)
        o = torch.empty_like(q)
        lse = torch.empty(8, n, device="cuda")
        part = torch.empty(8, n, 64, device="cuda")
        plse = torch.empty(8, n, device="cuda")
        t_pool = do_bench(lambda: pool_qkv(q, k, v, lay), return_mode="median")
        t_sel = do_bench(lambda: select(pooled, lay), return_mode="median")
        print(f"N={n} L={args.levels}: pool {t_pool:.3f} ms, select {t_sel:.3f} ms")
        t_cast = do_bench(lambda: pooled[1:].to(q.dtype), return_mode="median")
        print(f"  cast of pooled k/v {t_cast:.3f} ms")
        current = [(itf.TUNE["shared_kpi"], itf.TUNE["shared_warps"], itf.TUNE["shared_stages"])]
        grid = itertools.product([4, 8], [4, 8], [2, 3, 4]) if args.sweep else current
        for kpi, warps, stages in grid:
            itf.TUNE.update(shared_kpi=kpi, shared_warps=warps, shared_stages=stages)
            try:
                t = do_bench(lambda: itf._launch_q(lay, meta, q, k, v, pkv, sel, q, lse, lse, o, part, plse,
                                                   0.18, True, False), return_mode="median")
            except Exception as e:  # resource limits for some shapes
                print(f"  shared kpi={kpi} warps={warps} stages={stages}: failed ({type(e).__name__})")
                continue
            print(f"  q pass (shared kpi={kpi} warps={warps} stages={stages} + fine): {t:.3f} ms")


# Groups of TUNE keys swept together, and the values tried.
BACKWARD_GROUPS = {
    # num_stages=1 for the fine dk/dv kernel hit an illegal memory access on an H100 (triton 3.6), which
    # poisons the CUDA context for every later setting, so it is not tried
    "kv": dict(kv_rows=[64, 128], kv_warps=[4, 8], kv_stages=[3, 2]),
    "top": dict(top_keys=[64, 128], top_warps=[4, 8]),
    "cand": dict(cand_keys=[64, 128], cand_rows=[64, 128], cand_warps=[4, 8]),
}


def sweep_backward(ns, levels) -> dict:
    cases = []
    for n in ns:
        lv = levels if n < 262144 else max(levels, 3)
        kw = dict(block_size=16, topk=8, levels=lv, enrich_levels=lv, reweight=True, scale=0.125)
        q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        o = itf.llsa_attention_triton(q, k, v, **kw)
        cases.append((n, lv, o, (q, k, v), do))

    def total():
        return sum(do_bench(lambda: torch.autograd.grad(o, qkv, do, retain_graph=True), return_mode="median")
                   for _, _, o, qkv, do in cases)

    for group, space in BACKWARD_GROUPS.items():
        results = []
        for values in itertools.product(*space.values()):
            setting = dict(zip(space, values))
            itf.TUNE.update(setting)
            try:
                results.append((total(), setting))
            except Exception as e:
                # a device fault poisons the context for every later setting: stop there
                if type(e).__name__ == "AcceleratorError":
                    raise
                # resource limits for some shapes
                print(f"{group} {setting}: failed ({type(e).__name__})")
                continue
            print(f"{group} {setting}: backward {results[-1][0]:.3f} ms (summed over N={ns})")
        t, setting = min(results, key=lambda r: r[0])
        itf.TUNE.update(setting)
        print(f"best {group}: {setting} ({t:.3f} ms)")
    print(f"TUNE = {itf.TUNE}")
    return dict(itf.TUNE)


if __name__ == "__main__":
    main()
