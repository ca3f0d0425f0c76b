"""Pixel-space diffusion transformers."""
from llsa.models.dit import DIT_SIZES, DiT, DiTConfig, build_dit, load_lowres_checkpoint

__all__ = ["DiTConfig", "DiT", "DIT_SIZES", "build_dit", "load_lowres_checkpoint"]
