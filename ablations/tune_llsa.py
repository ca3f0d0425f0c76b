"""Time the stages of the LLSA forward separately and sweep the query-owned pass's launch shapes.

``python -m ablations.tune_llsa --n 65536 262144 --levels 2``: prints per-stage medians (pooling,
selection, shared pass, fine pass) for each setting of ``llsa.ops.llsa.interface.TUNE`` tried.
"""
import argparse
import itertools

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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
