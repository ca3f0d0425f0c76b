"""One attention layer's head split (QK RMSNorm + RoPE) and merge: the PyTorch formulas, eager and under
torch.compile, against the ``llsa.ops.heads`` kernels, forward and forward+backward (GPU).

``python -m benchmarks.bench_heads --tokens 65536 --batch 2 --heads 6 --dim 64`` (DiT-S at 256x256).
"""
import argparse

import torch
from triton.testing import do_bench

from llsa.models.dit import token_grid
from llsa.ops.heads import merge_heads, split_heads


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=65536, help="a square number (the RoPE grid is square)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args(argv)
    b, n, h, d = args.batch, args.tokens, args.heads, args.dim
    side = round(n ** 0.5)
    if side * side != n:
        raise SystemExit(f"--tokens must be a square number, got {n}")
    dev = torch.device("cuda")
    cos, sin, _ = token_grid(side, side, (side, side), d, True, dev)
    wq, wk = (torch.ones(d, device=dev, requires_grad=True) for _ in range(2))
    x = torch.randn(b, n, 3 * h * d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gs = [torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    o = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(b, n, h * d, device=dev, dtype=torch.bfloat16)
    mb = b * n * h * d * 2 / 1e6
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; b={b} n={n} heads={h} d={d} bf16; "
          f"one tensor {mb:.0f} MB")

    def split(backend):
        return lambda t: split_heads(t, h, cos, sin, wq, wk, backend=backend)

    def merge(backend):
        return lambda t: merge_heads(t, backend=backend)

    rows = [("pytorch eager", split("torch"), merge("torch")),
            ("pytorch compiled", torch.compile(split("torch")), torch.compile(merge("torch"))),
            ("kernels eager", split("auto"), merge("auto")),
            ("kernels compiled", torch.compile(split("auto")), torch.compile(merge("auto")))]
    print("| path | split fwd us | split fwd+bwd us | merge fwd us | merge fwd+bwd us |")
    print("|---|---|---|---|---|")
    for name, f, g in rows:
        fw = do_bench(lambda: f(x), return_mode="median")
        fb = do_bench(lambda: torch.autograd.backward(f(x), gs), grad_to_none=[x, wq, wk], return_mode="median")
        pf = do_bench(lambda: g(o), return_mode="median")
        pb = do_bench(lambda: g(o).backward(go), grad_to_none=[o], return_mode="median")
        print(f"| {name} | {fw * 1e3:.1f} | {fb * 1e3:.1f} | {pf * 1e3:.1f} | {pb * 1e3:.1f} |", flush=True)
    print(f"bytes: split fwd moves {6 * mb:.0f} MB (3 tensors in, 3 out), fwd+bwd {14 * mb:.0f} MB; "
          f"merge fwd {2 * mb:.0f} MB, fwd+bwd {4 * mb:.0f} MB")


if __name__ == "__main__":
    main()
