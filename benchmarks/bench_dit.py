"""End-to-end DiT training-step time with each attention, same batch, one process.

``python -m benchmarks.bench_dit --size DiT-S --res 128 --batch 4 --attn full vsa sla llsa``. A step is
flow-matching loss, backward and an AdamW update under bf16 autocast; the median of timed steps after
warm-up is reported with throughput in pixel tokens/s and the speed-up over the first attention listed.
VSA and SLA get LLSA's key budget (``matched_topk``). ``--profile 20`` also lists the 20 kernels with the
most GPU time in one step of each attention.
"""
import argparse
import statistics

import torch

from llsa.attention.budget import matched_topk
from llsa.flow import FlowMatching
from llsa.models import build_dit
from llsa.ops.llsa.levels import default_levels


def attention_options(name: str, n: int, levels: int | None) -> dict:
    if name == "llsa":
        return {"levels": levels} if levels else {}
    if name in ("vsa", "sla"):
        lv = levels or default_levels(n, 16)
        return {"topk": matched_topk(n, levels=lv, enrich_levels=lv)}
    return {}


def time_steps(size, res, batch, attn, levels, steps, warmup, compile_mode=None, profile=0, channels=3):
    n = res * res
    model = build_dit(size, image_size=res, in_channels=channels, attention=attn,
                      attention_options=attention_options(attn, n, levels)).cuda()
    if compile_mode:
        model.compile(mode=compile_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flow = FlowMatching(image_size=res)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.rand(batch, channels, res, res, device="cuda", generator=gen) * 2 - 1

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow.loss(model, x0, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**30
    report = ""
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        report = _kernel_report(prof, attn, profile)
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(times), peak, report


def _kernel_report(prof, attn: str, rows: int) -> str:
    """GPU time of one step by kernel name, largest first."""
    totals, counts = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] = totals.get(e.name, 0.0) + e.device_time / 1e3
            counts[e.name] = counts.get(e.name, 0) + 1
    lines = [f"{attn}: {sum(totals.values()):.1f} ms of GPU time in {sum(counts.values())} kernels; largest:"]
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {ms:8.2f} ms  x{counts[name]:<4d} {name[:90]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="DiT-S")
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--channels", type=int, default=3, help="image channels (1 for Fashion-MNIST)")
    p.add_argument("--attn", nargs="+", default=["full", "vsa", "sla", "llsa"])
    p.add_argument("--levels", type=int, default=None, help="LLSA levels (default: the spec's rule)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (raise it with --compile)")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="torch.compile every model with this mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also profile one step per attention and print its ROWS most expensive kernels")
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: {args.size} {args.res}x{args.res} "
          f"({args.res ** 2} tokens) batch {args.batch}, bf16 autocast, AdamW"
          + (f", torch.compile mode={args.compile}" if args.compile else ", eager"))
    print("| attention | step ms | images/s | tokens/s | peak GiB | speed-up |")
    print("|---|---|---|---|---|---|")
    base, reports = None, []
    for attn in args.attn:
        ms, peak, report = time_steps(args.size, args.res, args.batch, attn, args.levels, args.steps,
                                      args.warmup, args.compile, args.profile, args.channels)
        base = base or ms
        ips = args.batch / ms * 1e3
        print(f"| {attn} | {ms:.1f} | {ips:.2f} | {ips * args.res ** 2:.3g} | {peak:.1f} | {base / ms:.2f}x |")
        reports.append(report)
    for report in filter(None, reports):
        print(report)


if __name__ == "__main__":
    main()
