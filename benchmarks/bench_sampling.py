"""Sampling cost of a DiT: one Euler step's forward (no grad, bf16 autocast) on a batch, eager and compiled.

``python -m benchmarks.bench_sampling --res 64 --batch 250 --attn full llsa``. FID's generation costs
``samples / batch * sample_steps`` of these forwards; median of timed forwards after warm-up.
"""
import argparse
import statistics

import torch

from benchmarks.bench_dit import attention_options
from llsa.models import build_dit


def time_forward(size, res, batch, attn, compile_mode, steps, warmup, channels):
    model = build_dit(size, image_size=res, in_channels=channels, attention=attn,
                      attention_options=attention_options(attn, res * res, None)).cuda().eval()
    if compile_mode:
        model.compile(mode=compile_mode)
    x = torch.randn(batch, channels, res, res, device="cuda")
    t = torch.full((batch,), 500.0, device="cuda")
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x, t)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="DiT-S")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--attn", nargs="+", default=["full", "llsa"])
    p.add_argument("--compile", nargs="+", default=["none", "default"], help="modes to time (none = eager)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: {args.size} {args.res}x{args.res}, batch "
          f"{args.batch}, forward only, bf16 autocast")
    print("| attention | compile | forward ms | images/s per Euler step |")
    print("|---|---|---|---|")
    for attn in args.attn:
        for mode in args.compile:
            ms = time_forward(args.size, args.res, args.batch, attn, None if mode == "none" else mode, args.steps,
                              args.warmup, args.channels)
            print(f"| {attn} | {mode} | {ms:.1f} | {args.batch / ms * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
