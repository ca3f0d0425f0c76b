"""LLSA Lab: log-linear sparse attention and pixel-space diffusion transformers."""
from llsa.ops.llsa import hierarchical_topk, keys_per_query, llsa_attention

__all__ = ["llsa_attention", "hierarchical_topk", "keys_per_query"]
__version__ = "0.1.0"
