"""SLA on the shared block-sparse Triton kernels.

The critical blocks go through the softmax kernel. For the linear branch the global sums ``phi(Q) H``
and ``phi(Q) . Z`` (one D x D state per head) are dense PyTorch products, and the selected blocks' part
``sum_sel phi(q_i) h_j = sum_{t in sel} (phi(q_i) . phi(k_t)) v_t`` runs on the kernel in linear mode,
so no per-block D x D state is ever stored or gathered.
"""
from functools import partial

import torch

from llsa.ops.blocksparse.interface import (block_sparse_attention_triton, block_sparse_linear_triton,
                                            check_kernel_inputs, transpose_blocks)
from llsa.ops.blocksparse.naive import num_blocks
from llsa.ops.sla.naive import EPS, linear_branch, marginal_den, sla_combine, sla_select


def _sla_linear_triton(phi_q, phi_k, v, sel, *, block_size, lists):
    # one float32 copy feeds both the global and the selected sums, so their gradients also cancel in
    # float32 before autograd rounds the total once to the input dtype
    pq, pk, vf = phi_q.float(), phi_k.float(), v.float()
    num_sel, den_sel = block_sparse_linear_triton(pq, pk, vf, sel, block_size=block_size, lists=lists)
    # [b, h, D, D] and [b, h, D]: the states summed over every block
    h_all = pk.transpose(-1, -2) @ vf
    z_all = pk.sum(-2)
    num = pq @ h_all - num_sel
    den = (pq @ z_all[..., None]).squeeze(-1) - den_sel
    return num / (marginal_den(den[..., None]) + EPS)


def sla_attention_triton(q, k, v, proj_weight, proj_bias, *, block_size: int, topk: int, feature_map: str,
                         scale: float):
    check_kernel_inputs("sla", q, block_size)
    sel = sla_select(q, k, block_size=block_size, topk=topk)
    lists = None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # both kernels' backward walk the same key-major lists: build them once
        lists = transpose_blocks(sel, num_blocks(q.shape[-2], block_size))
    o_sparse = block_sparse_attention_triton(q, k, v, sel, block_size=block_size, scale=scale, lists=lists)
    impl = partial(_sla_linear_triton, block_size=block_size, lists=lists)
    o_linear = linear_branch(q, k, v, sel, block_size=block_size, kind=feature_map, impl=impl)
    return sla_combine(o_sparse, o_linear, proj_weight, proj_bias)
