"""Locality-preserving token orders for images and video.

LLSA pools runs of consecutive tokens, so a run should be a compact patch of the image. For a square
power-of-two image the order is Morton / Z-order, where every aligned run of ``4^j`` tokens is a
``2^j x 2^j`` square. :func:`locality_order` extends this to any grid shape with a guarantee that
holds for every ``j`` at once (see its docstring).
"""
from functools import lru_cache

import torch


def _bits(n: int) -> int:
    """Bits needed for coordinates ``0..n-1``."""
    return max(1, (n - 1).bit_length())


def _morton_key(coords: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Interleave the bits of ``coords`` (first axis most significant inside each group of ``d`` bits)."""
    d = len(coords)
    key = torch.zeros_like(coords[0])
    for b in range(bits):
        for axis, c in enumerate(coords):
            key |= ((c >> b) & 1) << (d * b + d - 1 - axis)
    return key


@lru_cache(maxsize=32)
def _locality_order(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    d = len(shape)
    bits = _bits(max(shape))
    # Built on the CPU whatever the default device, since the result is cached.
    axes = [torch.arange(n, dtype=torch.int64, device="cpu") for n in shape]
    coords = [c.flatten() for c in torch.meshgrid(*axes, indexing="ij")]
    # level[i] = the largest j with token i inside the core C_j (sides floored to multiples of 2^j)
    level = torch.zeros_like(coords[0])
    for j in range(1, bits + 1):
        core_sides = [(n >> j) << j for n in shape]
        inside = torch.ones_like(level, dtype=torch.bool)
        for c, side in zip(coords, core_sides):
            inside &= c < side
        level[inside] = j
    # Coarser cubes first, then Z-order; the level occupies the bits above every Morton bit.
    key = ((bits - level) << (d * bits)) | _morton_key(coords, bits)
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device="cpu")
    return perm, inv


def locality_order(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A locality-preserving order of the row-major tokens of a ``(H, W)`` image or ``(T, H, W)`` video.

    Returns int64 CPU tensors ``(perm, inv)``: ``tokens[..., perm, :]`` is the reordered sequence of
    row-major ``tokens`` and ``reordered[..., inv, :]`` restores row-major order.

    Construction, in ``d`` = 2 or 3 dimensions: the *core* ``C_j`` is the box whose sides are the grid's
    sides rounded down to multiples of ``2^j``. Each token belongs to the aligned ``2^s``-cube of the
    largest ``s`` with the token in ``C_s``; ``C_s \\ C_{s+1}`` is tiled exactly by such aligned cubes.
    Tokens are sorted by ``s`` descending, then by Morton key (interleaved bits, time before row before
    column inside each group). For a square power-of-two image this is plain Morton order.

    Guarantee, for every ``j``: the first ``|C_j|`` tokens are exactly the cells of ``C_j``, and among
    them every aligned run of ``2^(d*j)`` tokens is one aligned ``2^j``-cube; more generally an aligned
    run of ``2^m`` tokens (``m <= d*j``) is an aligned box with sides ``2^floor(m/d)`` or
    ``2^ceil(m/d)``. In 2-D: aligned runs of ``4^j`` tokens are ``2^j x 2^j`` squares, so with block
    size 16 every level-1 block inside ``C_2`` is a 4 x 4 patch and every level-2 block inside ``C_4``
    is a 16 x 16 patch. Every later aligned run of ``2^(d*j)`` tokens is a union of whole aligned cubes
    of side < ``2^j``, all in the boundary band outside ``C_j`` (thinner than ``2^j`` along the far
    edges). If ``2^j`` divides every side, ``C_j`` is the whole grid.

    Why: cubes are visited coarse to fine, and each cube of side ``2^s`` starts at a multiple of
    ``2^(d*s)`` (everything before it is whole cubes of side ``>= 2^s``), so no aligned run of
    ``2^(d*j)``, ``j <= s``, crosses its edge; inside a Morton-ordered cube an aligned run of ``2^m``
    fixes all but the lowest ``m`` interleaved bits, which is a box. Cubes of side ``< 2^j`` start at
    multiples of their own size, which divides ``2^(d*j)``, so none straddles a run boundary either.

    Video uses the 3-D construction (T, H, W interleaved) rather than frame-major order, so runs of 16
    tokens are 2 x 2 x 4 (t, h, w) boxes and pooled tokens mix neighbouring frames, as video tiles do.
    Results are cached per shape; the returned tensors are fresh copies.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"locality_order: `shape` must be (H, W) or (T, H, W) with positive sides, got {shape}")
    perm, inv = _locality_order(shape)
    return perm.clone(), inv.clone()
