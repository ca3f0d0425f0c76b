"""Block-sparse attention over per-query-block lists of key blocks: the kernel VSA and SLA share.

The reference pieces live in ``naive``; the Triton kernels (imported lazily, since they need Triton) in
``interface``.
"""
from llsa.ops.blocksparse.naive import (block_broadcast, block_mean, block_sparse_attention_torch, num_blocks,
                                        topk_blocks)

__all__ = ["block_broadcast", "block_mean", "block_sparse_attention_torch", "num_blocks", "topk_blocks"]
