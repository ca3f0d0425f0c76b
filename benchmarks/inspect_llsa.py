"""Registers, spills, shared memory, matrix instructions and instructions per loop step of the LLSA kernels
as compiled for an H100, on any machine (no GPU needed).

``python -m benchmarks.inspect_llsa --dim 64 128`` compiles the fused query-owned pass (forward and dq) and
the fine dk/dv kernel with the launch shapes ``tuning.tune(d)`` gives them, and dense attention's loop
(``benchmarks.dense_ceiling``) at the fused forward's tile for comparison, for sm_90a, reads the
register and spill counts from ``ptxas -v``, and counts the SASS instructions of one step of each innermost
loop (per warp; in the fused passes: enriched candidates, coarsest level, fine segment). Device time is
scarce: a tile shape that spills, or fills an SM's shared memory, shows here before it is timed, and so does
work that should not be in a loop (a software log2 per key in every shared step, for example, is ~30% of those
steps' instructions and shows here at once). The numbers are this machine's Triton's; to see what
the H100 machine runs, install its version beside the project's and put it first
(``pip install --target /tmp/t36 triton==3.6.0``, then ``PYTHONPATH=/tmp/t36:.``).
"""
import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.dense_ceiling import dense_fwd_pointer_kernel
from llsa.ops.llsa.bwd import llsa_kv_kernel
from llsa.ops.llsa.fwd import llsa_q_kernel
from llsa.ops.llsa.layout import Layout
from llsa.ops.llsa.tuning import HEAD_DIMS, fused_shape, fused_steps, tune
from llsa.ops.llsa.tuning import even as even_tiles

H100 = GPUTarget("cuda", 90, 32)
# pointer arguments that are not the input dtype
POINTERS = {"SEL": "*i32", "IDX": "*i32", "META": "*i64", "ROWPTR": "*i64", "LSE": "*fp32", "DELTA": "*fp32",
            "PART": "*fp32", "PLSE": "*fp32", "DPK": "*fp32", "DPV": "*fp32"}
# integer arguments that a long sequence makes multiples of 16, which Triton specialises on at launch
ALIGNED = {"N", "n_pool", "n_sel", "kv_plane"}


def _signature(fn, constexprs: dict) -> tuple[dict, dict]:
    """Argument types and divisibility hints of a launch with bf16 inputs: capitalised names are pointers
    (bf16 unless POINTERS says otherwise), except N; lower-case ones are int32, except the float scale."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name[0].isupper() and name != "N":
            sig[name] = POINTERS.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas() -> str:
    return os.environ.get("TRITON_PTXAS_PATH") or _tool("ptxas")


def inspect(fn, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
    """Compile ``fn`` for an H100 (at most ``maxnreg`` registers per thread, if given) and report what ptxas
    and the PTX say about it."""
    sig, attrs = _signature(fn, constexprs)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=H100,
                            options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), f"-arch=sm_{H100.arch}a", "-v", path, "-o", path + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_tool("nvdisasm"), "-c", path + ".cubin"], capture_output=True, text=True,
                              check=True).stdout

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), shared=kernel.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async.sync"), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                serialized="C7515" in log, loops=inner_loops(sass))


def inner_loops(sass: str) -> list[int]:
    """SASS instructions per iteration of each innermost loop, in program order: what one step of a key
    loop issues per warp (a loop is a backward branch; an outer loop's body holds inner ones)."""
    ins, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ins)
            continue
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if op:
            ins.append(op.group(1))
    for end, op in enumerate(ins):
        target = re.search(r"BRA.*?(\.L_x_\d+)", op)
        if target and labels.get(target.group(1), end) < end:
            loops.append((labels[target.group(1)], end))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [b - a + 1 for a, b in inner]


def kernels(d: int, even: bool = True) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, constexprs, launch options) of the kernels inspected, as launched at head dim ``d``
    with block 16 and 65,536 tokens in two levels (shared segments and the coarsest level), reweighting, bf16;
    ``even=False`` compiles the query-owned pass's masked path, which N off the B^L grid takes."""
    t = tune(d)
    out = []
    for pre, bwd in (("fwd_", False), ("dq_", True)):
        lay = Layout(65536, 16, 8, 2, 2)
        shape = fused_shape(lay, t, pre)
        options = {key: shape.pop(key) for key in ("num_warps", "num_stages", "maxnreg")}
        const = dict(B=16, D=d, FINE=False, SHARED=True, MERGE=False, TOP=True, REWEIGHT=True, BWD=bwd,
                     SWAP=False, PREC="tf32", WIDE=False, FUSED=True, MAKE_DELTA=bwd,
                     EVEN=even and even_tiles(lay, d ** -0.5, shape["BM"], fused_steps(lay, shape)), **shape)
        out.append((f"fused {'dq' if bwd else 'forward'} (BM={shape['BM']})", llsa_q_kernel, const, options))
    const = dict(B=16, D=d, BMQ=t["kv_rows"], POOLED=True, REWEIGHT=True, PREC="tf32")
    out.append((f"fine dk/dv (BMQ={t['kv_rows']})", llsa_kv_kernel, const,
                dict(num_warps=t["kv_warps"], num_stages=t["kv_stages"])))
    # dense attention's loop (benchmarks/dense_ceiling.py) at the fused forward's rows, warps and stages and
    # its coarsest step's keys: what one step of the same products costs with no gathers, weights or masks
    rows, keys = t["fwd_rows"], t["fwd_top_keys"]
    out.append((f"dense loop (BM={rows}, BN={keys})", dense_fwd_pointer_kernel,
                dict(D=d, BM=rows, BN=keys, STAGES=t["fwd_stages"]),
                dict(num_warps=t["fwd_warps"], num_stages=t["fwd_stages"], maxnreg=None)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, nargs="+", default=[64, 128], choices=HEAD_DIMS)
    p.add_argument("--uneven", action="store_true",
                   help="the query-owned pass's masked path (N not a multiple of B^L) instead of the even one")
    args = p.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{H100.arch}a, bf16, block 16")
    print("| kernel | D | warps | stages | registers | spill stores / loads (B) | shared (KB) | wgmma | mma.sync "
          "| wgmma serialised | SASS per inner-loop step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.dim:
        for name, fn, const, options in kernels(d, even=not args.uneven):
            r = inspect(fn, const, **options)
            print(f"| {name} | {d} | {options['num_warps']} | {options['num_stages']} | {r['registers']} | "
                  f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} | {r['wgmma']} | "
                  f"{r['mma_sync']} | {'yes' if r['serialized'] else 'no'} | {', '.join(map(str, r['loops']))} |",
                  flush=True)


if __name__ == "__main__":
    main()
