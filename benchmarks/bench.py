"""Kernel benchmark: LLSA (and the sparse baselines) against SDPA's flash backend, in one process.

``python run.py bench`` or ``python -m benchmarks.bench``. Times forward and forward+backward with
``triton.testing.do_bench`` medians, prints a table, writes ``bench.csv`` and ``bench.png``. A method is
timed only after it passes a correctness check against its plain-PyTorch reference at that shape
(flash-attention rule: error <= 2x the reference's own low-precision error + a floor).
"""
import argparse
import csv
import functools
import itertools
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llsa.testing import flash_rule_failure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The correctness check runs at min(N, this) on one (batch, head): every level is exercised, and the
# float32 references (dense over blocks for VSA and SLA) fit beside the benchmark tensors.
CHECK_MAX_N = 16384


@dataclass
class Method:
    """How to run, check and count one attention method."""

    name: str
    run: Callable  # (q, k, v) -> o
    reference: Callable | None  # (q, k, v) -> o, plain PyTorch, same picks where selection matters
    keys_per_query: Callable  # n -> attended keys per query (executed work)


def sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def llsa_method(block, topk, levels_for) -> Method:
    from llsa.ops.llsa.interface import hierarchical_topk_triton, llsa_attention_triton
    from llsa.ops.llsa.levels import keys_per_query
    from llsa.ops.llsa.naive import llsa_attention_torch

    def args(n, d):
        lv = levels_for(n)
        return dict(block_size=block, topk=topk, levels=lv, enrich_levels=lv, reweight=True, scale=d ** -0.5)

    def run(q, k, v):
        return llsa_attention_triton(q, k, v, **args(q.shape[-2], q.shape[-1]))

    def reference(q, k, v):
        a = args(q.shape[-2], q.shape[-1])
        sel = hierarchical_topk_triton(q.detach(), k.detach(), block_size=block, topk=topk, levels=a["levels"])
        return llsa_attention_torch(q, k, v, sel=sel, **a)

    def kpq(n):
        lv = levels_for(n)
        return keys_per_query(n, block, topk, lv, lv)

    return Method("llsa", run, reference, kpq)


def baseline_methods(block: int, topk_for: Callable) -> list[Method]:
    """VSA and SLA at LLSA's key budget, where their kernels are installed."""
    out = []
    try:
        from llsa.ops.vsa import vsa_attention
        from llsa.ops.sla import sla_attention
    except ImportError:
        return out

    # the methods' own inputs (VSA's gate, SLA's projection), made once per shape: a model computes them
    # outside the attention, so allocating them in every timed call would charge the method for a memset
    @functools.cache
    def zeros(*shape, device, dtype=torch.float32):
        return torch.zeros(*shape, device=device, dtype=dtype)

    def vsa(backend):
        def f(q, k, v):
            gate = zeros(*q.shape, device=q.device, dtype=q.dtype)
            return vsa_attention(q, k, v, gate, block_size=block, topk=topk_for(q.shape[-2]), backend=backend)
        return f

    def sla(backend):
        def f(q, k, v):
            d = q.shape[-1]
            return sla_attention(q, k, v, zeros(d, d, device=q.device), zeros(d, device=q.device),
                                 block_size=block, topk=topk_for(q.shape[-2]), feature_map="softmax",
                                 backend=backend)
        return f

    out.append(Method("vsa", vsa("triton"), vsa("torch"), lambda n: topk_for(n) * block + math.ceil(n / block)))
    out.append(Method("sla", sla("triton"), sla("torch"), lambda n: topk_for(n) * block))
    return out


def check(method: Method, n: int, b: int, h: int, d: int, dtype) -> str | None:
    """None if the method passes the flash-attention rule at (min(N, CHECK_MAX_N)), else the failure."""
    if method.reference is None:
        return None
    n = min(n, CHECK_MAX_N)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    o = method.run(q, k, v)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = method.reference(*x32)
    g_ref = torch.autograd.grad(ref, x32, do.float())
    xl = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    low = method.reference(*xl)
    g_low = torch.autograd.grad(low, xl, do)
    for name, a, r, lo in [("o", o, ref, low)] + list(zip(("dq", "dk", "dv"), g, g_ref, g_low)):
        failure = flash_rule_failure(name, a, r, lo)
        if failure is not None:
            return failure
    return None


def time_method(fn, sets, graph: bool = False, repeat: int = 1, bench=None, bench_graph=None
                ) -> dict[str, float | str]:
    """Median ms of forward and forward+backward, two ways: on the first of ``sets`` (tuples q, k, v, do)
    every call, and cycling through all of them (``*_cycle_ms``), as a model's layers call attention on
    different tensors. The first is the best case for CUDA graphs the op binds to its callers' tensors; the
    second is what a deep model sees. With ``graph``, the one-set passes are also replayed from a CUDA graph
    of the whole call, which takes the host (Python, launches) out and leaves the GPU's own time. With
    ``repeat`` > 1 each timing is the median of that many ``do_bench`` medians, and their range is kept: where
    the host bounds a call, its time moves with the machine's scheduling from one run to the next.
    ``bench``/``bench_graph`` default to ``triton.testing.do_bench``/``do_bench_cudagraph``."""
    if bench is None:
        from triton.testing import do_bench as bench, do_bench_cudagraph as bench_graph

    def passes(pool):
        turn = itertools.cycle(pool)

        def fwd():
            q, k, v, _ = next(turn)
            fn(q, k, v)

        def step():
            q, k, v, do = next(turn)
            fn(q, k, v).backward(do)

        leaves = [x for q, k, v, _ in pool for x in (q, k, v)]
        return (("fwd", fwd, None), ("fwdbwd", step, leaves))

    out: dict[str, float | str] = {}
    for suffix, pool in (("", sets[:1]), ("_cycle", sets)):
        for pass_, f, grads in passes(pool):
            key = f"{pass_}{suffix}_ms"
            runs = [bench(f, warmup=25, rep=100, grad_to_none=grads, return_mode="median") for _ in range(repeat)]
            out[key] = statistics.median(runs)
            if repeat > 1:
                out[f"{key}_range"] = f"{min(runs):.3f}-{max(runs):.3f}"
    if graph:
        for pass_, f, grads in passes(sets[:1]):
            try:
                out[f"{pass_}_graph_ms"] = bench_graph(f, rep=100, grad_to_none=grads, return_mode="median")
            except Exception as err:  # a capture failure is a finding to report, not a crash
                out[f"{pass_}_graph_ms"] = f"capture failed: {type(err).__name__}"
                torch.cuda.synchronize()
    return out


def sets_that_fit(want: int, elements: int, element_bytes: int, free_bytes: int) -> int:
    """How many tensor sets (q, k, v, do and the three gradients: 7 tensors of ``elements``) fit in a
    quarter of ``free_bytes``, at most ``want`` and at least one."""
    return max(1, min(want, free_bytes // 4 // (7 * elements * element_bytes)))


def device_line() -> str:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{name}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"


def parse_levels(items: list[str]) -> dict[int | None, int]:
    """``["2"]`` -> {None: 2} (every N); ``["16384:2", "65536:2"]`` -> {16384: 2, 65536: 2}."""
    out: dict[int | None, int] = {}
    for item in items:
        n, sep, lv = item.rpartition(":")
        try:
            key, value = (int(n) if sep else None), int(lv)
        except ValueError:
            raise SystemExit(f"bench: --levels takes L or N:L, got {item!r}") from None
        if value < 1:
            raise SystemExit(f"bench: levels must be >= 1, got {item!r}")
        out[key] = value
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="run.py bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 262144], help="sequence lengths")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--levels", nargs="+", default=[], metavar="L|N:L",
                   help="LLSA levels: one number for every N, or N:L pairs (other N keep the spec's rule); "
                        "the headline table: --levels 16384:2 65536:2")
    p.add_argument("--methods", nargs="+", default=["llsa", "vsa", "sla"],
                   help="sparse methods to time beside SDPA (llsa, vsa, sla)")
    p.add_argument("--cudagraph", action="store_true",
                   help="also time every method replayed from a CUDA graph (GPU time without host overhead)")
    p.add_argument("--sets", type=int, default=24,
                   help="distinct q/k/v sets the cycle timing calls in turn, as a model of that many layers "
                        "(fewer where they would not fit in a quarter of free GPU memory; the table says)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each eager pass this many times and report the median (and the range)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.csv and bench.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.repeat < 1 or args.sets < 1:
        print(f"bench: --repeat and --sets must be >= 1, got {args.repeat} and {args.sets}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench: needs a CUDA GPU (the kernels are timed against FlashAttention)", file=sys.stderr)
        return 2
    from llsa.ops.llsa.levels import default_levels

    dtype = DTYPES[args.dtype]
    b, h, d = args.batch, args.heads, args.dim

    chosen = parse_levels(args.levels)

    def levels_for(n):
        return chosen.get(n, chosen.get(None)) or default_levels(n, args.block)

    def topk_for(n):
        from llsa.attention.budget import matched_topk

        lv = levels_for(n)
        return matched_topk(n, block_size=args.block, topk=args.topk, levels=lv, enrich_levels=lv)

    methods = [llsa_method(args.block, args.topk, levels_for)]
    if {"vsa", "sla"} & set(args.methods):
        methods += baseline_methods(args.block, topk_for)
    methods = [m for m in methods if m.name in args.methods]
    print(device_line())
    print(f"B={b} H={h} D={d} {args.dtype} block={args.block} topk={args.topk}")
    rows = []
    from llsa.ops.llsa import graphs

    for n in args.n:
        torch.manual_seed(n)
        count = sets_that_fit(args.sets, b * h * n * d, dtype.itemsize, torch.cuda.mem_get_info()[0])
        if count < args.sets:
            print(f"bench: N={n}: the cycle uses {count} tensor sets, not {args.sets}: more would not fit")
        sets = [tuple(torch.randn(b, h, n, d, device="cuda", dtype=dtype).requires_grad_(i < 3) for i in range(4))
                for _ in range(count)]
        q = sets[0][0]
        dense = 4 * b * h * n * n * d
        base = time_method(sdpa, sets, args.cudagraph, args.repeat)
        rows.append(dict(n=n, method="sdpa", levels="", keys=n, sets=count, **base,
                         **_rates(base, base, executed=dense, dense=dense)))
        print(_row_line(rows[-1]), flush=True)
        for m in methods:
            try:
                failure = check(m, n, b, h, d, dtype)
                if failure is not None:
                    print(f"bench: {m.name} at N={n} FAILED its correctness check ({failure}); not timed")
                    rows.append(dict(n=n, method=m.name, levels="", keys="", fwd_ms="failed",
                                     fwdbwd_ms="failed"))
                    continue
                times = time_method(m.run, sets, args.cudagraph, args.repeat)
            except torch.OutOfMemoryError:
                print(f"bench: {m.name} at N={n} ran out of GPU memory")
                rows.append(dict(n=n, method=m.name, levels="", keys="", fwd_ms="oom", fwdbwd_ms="oom"))
                torch.cuda.empty_cache()
                continue
            keys = m.keys_per_query(n)
            # LLSA's small eager calls replay a CUDA graph inside the op (llsa.ops.llsa.graphs)
            replay = "yes" if m.name == "llsa" and graphs.usable(q) else ""
            rows.append(dict(n=n, method=m.name, levels=levels_for(n) if m.name == "llsa" else "", keys=keys,
                             sets=count, op_graph=replay, **times,
                             **_rates(times, base, executed=4 * b * h * n * keys * d, dense=dense)))
            print(_row_line(rows[-1]), flush=True)
        del q, sets
        torch.cuda.empty_cache()
    write_outputs(rows, args.out, f"{device_line()} | B={b} H={h} D={d} {args.dtype}")
    return 0


# op_graph "yes": the op replayed a CUDA graph inside each call; the one-set columns are then its bound-graph
# best case, the cycle columns what a model with ``sets`` layers sees
COLUMNS = ["n", "method", "levels", "keys", "op_graph", "sets",
           "fwd_ms", "fwdbwd_ms", "fwd_speedup", "fwdbwd_speedup",
           "fwd_tflops_exec", "fwd_tflops_dense", "fwdbwd_tflops_exec", "fwdbwd_tflops_dense",
           "fwd_cycle_ms", "fwdbwd_cycle_ms", "fwd_cycle_speedup", "fwdbwd_cycle_speedup",
           "fwd_cycle_tflops_exec", "fwd_cycle_tflops_dense", "fwdbwd_cycle_tflops_exec", "fwdbwd_cycle_tflops_dense",
           "fwd_graph_ms", "fwdbwd_graph_ms", "fwd_graph_speedup", "fwdbwd_graph_speedup",
           "fwd_ms_range", "fwdbwd_ms_range", "fwd_cycle_ms_range", "fwdbwd_cycle_ms_range"]


def _rates(times: dict, base: dict, executed: float, dense: float) -> dict[str, float]:
    """Speed-ups over SDPA (``base``) and TFLOP/s; the backward counts 2.5x the forward's FLOPs."""
    out = {}
    for pass_, flops in (("fwd", 1.0), ("fwdbwd", 3.5)):
        for mode in ("", "_cycle"):
            t = times.get(f"{pass_}{mode}_ms")
            if not isinstance(t, float):
                continue
            out[f"{pass_}{mode}_speedup"] = base[f"{pass_}{mode}_ms"] / t
            out[f"{pass_}{mode}_tflops_exec"] = flops * executed / t / 1e9
            out[f"{pass_}{mode}_tflops_dense"] = flops * dense / t / 1e9
        graph, graph_base = times.get(f"{pass_}_graph_ms"), base.get(f"{pass_}_graph_ms")
        if isinstance(graph, float) and isinstance(graph_base, float):
            out[f"{pass_}_graph_speedup"] = graph_base / graph
    return out


def _fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _row_line(r):
    return "| " + " | ".join(_fmt(r.get(c, "")) for c in COLUMNS) + " |"


def write_outputs(rows, out, title):
    os.makedirs(out, exist_ok=True)
    cols = COLUMNS
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(_row_line(r))
    plot(rows, os.path.join(out, "bench.png"), title)
    print(f"wrote {out}/bench.csv and {out}/bench.png")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method and isinstance(r.get("fwd_ms"), float)]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        axes[0].plot(ns, [r["fwd_ms"] for r in pts], "o-", label=f"{method} fwd")
        axes[0].plot(ns, [r["fwdbwd_ms"] for r in pts], "s--", label=f"{method} fwd+bwd")
        if method != "sdpa":
            axes[1].plot(ns, [r["fwd_speedup"] for r in pts], "o-", label=f"{method} fwd, one set")
            axes[1].plot(ns, [r["fwdbwd_speedup"] for r in pts], "s--", label=f"{method} fwd+bwd, one set")
            cyc = [r for r in pts if isinstance(r.get("fwd_cycle_speedup"), float)]
            if cyc:
                cn = [r["n"] for r in cyc]
                axes[1].plot(cn, [r["fwd_cycle_speedup"] for r in cyc], "o:", label=f"{method} fwd, cycle")
                axes[1].plot(cn, [r["fwdbwd_cycle_speedup"] for r in cyc], "s:", label=f"{method} fwd+bwd, cycle")
    for ax, ylabel in zip(axes, ["time (ms), one tensor set", "speed-up over SDPA (flash)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
