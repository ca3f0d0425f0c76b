"""The fastest dense attention forward that Triton reaches on this card: a ceiling for LLSA's fused pass.

LLSA's fused pass runs the same inner loop as dense FlashAttention (scores, online softmax, P·V) on keys it
gathers, plus per-key weights. A dense kernel with contiguous keys, no weights and no masks is that loop at its
cheapest, so its best rate over tile shapes bounds what the fused pass can reach with this Triton on this
card. ``python -m benchmarks.dense_ceiling`` sweeps tile shapes of two dense kernels (keys loaded through
pointers, as the fused pass loads them, and through tensor descriptors, the TMA path of Hopper), checks the
best of each against SDPA, and prints their TFLOP/s beside SDPA's flash and cuDNN backends; ``--csv FILE``
keeps the rows. B=2, H=4, D=64, bf16, non-causal: the headline shape of docs/benchmarks.md.
"""
import argparse
import csv
import itertools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from llsa.ops.common import LOG2E
from llsa.ops.llsa.tuning import HEAD_DIMS


@triton.jit
def _softmax_step(b_q, b_k, b_v, b_acc, b_m, b_l, qk_scale):
    # [BM, BN]: raw scores; the scale joins exp2's offset in one FFMA
    b_s = tl.dot(b_q, tl.trans(b_k))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    # [BM, BN]
    b_p = tl.math.exp2(b_s * qk_scale - b_mn[:, None])
    b_alpha = tl.math.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_acc, b_mn, b_l


@triton.jit
def dense_fwd_pointer_kernel(Q, K, V, O, N, qk_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             STAGES: tl.constexpr):
    """One program per (BM queries, batch·head); keys and values through pointers."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    o_base = i_bh.to(tl.int64) * N * D
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    # [BM, D]
    b_q = tl.load(Q + o_base + o_m[:, None].to(tl.int64) * D + o_d[None, :])
    # [BM]
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    # [BM, D]
    b_acc = tl.zeros([BM, D], tl.float32)
    for i_n in tl.range(0, N, BN, num_stages=STAGES):
        p_kv = o_base + (i_n + o_n)[:, None].to(tl.int64) * D + o_d[None, :]
        # [BN, D]
        b_k = tl.load(K + p_kv)
        b_v = tl.load(V + p_kv)
        b_acc, b_m, b_l = _softmax_step(b_q, b_k, b_v, b_acc, b_m, b_l, qk_scale)
    tl.store(O + o_base + o_m[:, None].to(tl.int64) * D + o_d[None, :], (b_acc / b_l[:, None]).to(O.dtype.element_ty))


@triton.jit
def dense_fwd_tma_kernel(desc_q, desc_k, desc_v, desc_o, N, qk_scale, D: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, STAGES: tl.constexpr):
    """The same program with q, k, v and o as tensor descriptors over the (B·H·N, D) rows."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_row = i_bh * N
    # [BM, D]
    b_q = desc_q.load([i_row + i_m * BM, 0])
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, D], tl.float32)
    for i_n in tl.range(0, N, BN, num_stages=STAGES):
        # [BN, D]
        b_k = desc_k.load([i_row + i_n, 0])
        b_v = desc_v.load([i_row + i_n, 0])
        b_acc, b_m, b_l = _softmax_step(b_q, b_k, b_v, b_acc, b_m, b_l, qk_scale)
    desc_o.store([i_row + i_m * BM, 0], (b_acc / b_l[:, None]).to(desc_o.dtype))


def dense_attention(q, k, v, style="pointer", block_m=128, block_n=64, num_warps=8, num_stages=2):
    """Softmax attention of q (B, H, N, D) over k, v with no mask, by one of the two dense kernels."""
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if n % block_m or n % block_n:
        raise ValueError(f"N={n} must be a multiple of block_m={block_m} and block_n={block_n}: these kernels "
                         "have no tail masks, to stay the cheapest form of the loop")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} must be one of {HEAD_DIMS}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.full_like(q, float("nan"))
    grid = (n // block_m, b * h)
    qk_scale = LOG2E / math.sqrt(d)
    shape = dict(D=d, BM=block_m, BN=block_n, STAGES=num_stages, num_warps=num_warps, num_stages=num_stages)
    if style == "pointer":
        dense_fwd_pointer_kernel[grid](q, k, v, o, n, qk_scale, **shape)
    elif style == "tma":
        descs = [TensorDescriptor.from_tensor(x.view(b * h * n, d), [rows, d])
                 for x, rows in ((q, block_m), (k, block_n), (v, block_n), (o, block_m))]
        dense_fwd_tma_kernel[grid](*descs, n, qk_scale, **shape)
    else:
        raise ValueError(f"style must be 'pointer' or 'tma', got {style!r}")
    return o


def _tflops(b, h, n, d, ms):
    return 4 * b * h * n * n * d / ms / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536],
                        help="sequence lengths; the sweep runs at the first, the best shapes at every one")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--csv", help="write every timed row here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dense_ceiling times kernels on a GPU; there is none here")
    b, h, d = args.batch, args.heads, args.dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"B={b} H={h} D={d} bf16")
    rows = []

    def inputs(n):
        torch.manual_seed(0)
        return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def record(n, name, fn):
        ms = do_bench(fn, return_mode="median")
        rows.append(dict(n=n, kernel=name, ms=ms, tflops=_tflops(b, h, n, d, ms)))
        print(f"N={n:>7} {name:<44} {ms:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
        return ms

    shapes = [(bm, bn, w, s) for bm, w in ((64, 4), (128, 4), (128, 8)) for bn, s in
              itertools.product((64, 128), (2, 3, 4))]
    n0 = args.n[0]
    q, k, v = inputs(n0)
    best = {}
    for style, (bm, bn, w, s) in itertools.product(("pointer", "tma"), shapes):
        name = f"{style} BM={bm} BN={bn} warps={w} stages={s}"
        try:
            ms = record(n0, name, lambda: dense_attention(q, k, v, style, bm, bn, w, s))
        except Exception as err:  # a shape this Triton cannot compile or fit in shared memory
            print(f"N={n0:>7} {name:<44} failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        if style not in best or ms < best[style][0]:
            best[style] = (ms, (bm, bn, w, s))
    # flash-attention's criterion: within twice SDPA's own bf16 error against float32, plus a rounding floor
    q2, k2, v2 = (x[:, :, :2048] for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q2.float(), k2.float(), v2.float())
    sdpa_err = (F.scaled_dot_product_attention(q2, k2, v2).float() - ref).abs().max().item()
    for style, (_, shape) in best.items():
        err = (dense_attention(q2, k2, v2, style, *shape).float() - ref).abs().max().item()
        print(f"best {style} {shape}: max |error| against float32 at N=2048 {err:.2e} (SDPA bf16: {sdpa_err:.2e})")
        if not err <= 2 * sdpa_err + 1e-5:
            raise SystemExit(f"the {style} kernel disagrees with SDPA: its rates mean nothing")
    for n in args.n:
        q, k, v = inputs(n)
        for style, (_, (bm, bn, w, s)) in best.items():
            record(n, f"best {style} BM={bm} BN={bn} warps={w} stages={s}",
                   lambda: dense_attention(q, k, v, style, bm, bn, w, s))
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                try:
                    record(n, f"SDPA {backend.lower()}", lambda: F.scaled_dot_product_attention(q, k, v))
                except RuntimeError as err:
                    print(f"N={n:>7} SDPA {backend.lower()} unavailable: {str(err).splitlines()[0][:80]}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
