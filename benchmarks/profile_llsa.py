"""Where LLSA's time goes: GPU time of every kernel of one forward and one backward, and the host time.

``python -m benchmarks.profile_llsa --n 4096 65536 --levels 2``. Prints, per N, the device kernels in launch
order with their times (the same kernel launched twice, e.g. the shared and fine query passes, shows
twice) and the wall time of the call with and without a device synchronisation, so launch and Python
overhead can be told apart from kernel time.
"""
import argparse
import time

import torch

from llsa.ops.llsa.interface import llsa_attention_triton
from llsa.ops.llsa.levels import default_levels


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--levels", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--host", action="store_true",
                   help="also profile the host side: the CPU ops of forward and backward, and cProfile")
    args = p.parse_args(argv)
    for n in args.n:
        lv = args.levels or default_levels(n, 16)
        kw = dict(block_size=16, topk=8, levels=lv, enrich_levels=lv, reweight=True, scale=args.dim ** -0.5)
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        for _ in range(3):
            llsa_attention_triton(q, k, v, **kw).backward(do)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            o = llsa_attention_triton(q, k, v, **kw)
        t_host = (time.perf_counter() - t0) / 20
        torch.cuda.synchronize()
        t_all = (time.perf_counter() - t0) / 20
        print(f"N={n} L={lv}: forward host time {t_host * 1e3:.3f} ms/call, with device {t_all * 1e3:.3f} ms/call")
        t0 = time.perf_counter()
        for _ in range(20):
            torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
        t_host = (time.perf_counter() - t0) / 20
        torch.cuda.synchronize()
        t_all = (time.perf_counter() - t0) / 20
        print(f"  backward host time {t_host * 1e3:.3f} ms/call, with device {t_all * 1e3:.3f} ms/call")
        # without earlier gradients, so no accumulation kernels join the backward's
        q.grad = k.grad = v.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            o = llsa_attention_triton(q, k, v, **kw)
            o.backward(do)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time for e in kernels)
        print(f"{len(kernels)} kernels, {total:.1f} us of GPU time (forward, then backward):")
        for e in kernels:
            print(f"  {e.name[:64]:64s} {e.device_time:9.1f} us")
        if args.host:
            # the profiled backward above freed o's graph
            o = llsa_attention_triton(q, k, v, **kw)
            cpu = torch.profiler.ProfilerActivity.CPU
            for name, fn in (("forward", lambda: llsa_attention_triton(q, k, v, **kw)),
                             ("backward", lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))):
                with torch.profiler.profile(activities=[cpu]) as prof:
                    for _ in range(10):
                        fn()
                    torch.cuda.synchronize()
                print(f"host side of 10 {name} calls:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                max_name_column_width=50))
            import cProfile
            import pstats

            for name, fn in (("forward", lambda: llsa_attention_triton(q, k, v, **kw)),
                             ("forward+backward", lambda: llsa_attention_triton(q, k, v, **kw).backward(do))):
                with cProfile.Profile() as host:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                print(f"cProfile of 20 {name} calls:")
                pstats.Stats(host).sort_stats("tottime").print_stats(22)

if __name__ == "__main__":
    main()
