"""VSA with its fine branch on the shared block-sparse Triton kernel; the coarse branch (N/B pooled
tokens) stays in PyTorch, whose autograd carries its gradient back through the pooling."""
from llsa.ops.blocksparse.interface import block_sparse_attention_triton, check_kernel_inputs
from llsa.ops.vsa.naive import vsa_coarse, vsa_combine


def vsa_attention_triton(q, k, v, gate, *, block_size: int, topk: int, scale: float):
    check_kernel_inputs("vsa", q, block_size)
    o_coarse, sel = vsa_coarse(q, k, v, block_size=block_size, topk=topk, scale=scale)
    o_fine = block_sparse_attention_triton(q, k, v, sel, block_size=block_size, scale=scale)
    return vsa_combine(o_fine, o_coarse, gate, block_size)
