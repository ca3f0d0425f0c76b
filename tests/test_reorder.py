import pytest
import torch

from llsa.reorder import locality_order


def coords_of(perm: torch.Tensor, shape) -> torch.Tensor:
    """(N, d) grid coordinates of the reordered tokens."""
    return torch.stack(torch.unravel_index(perm, shape), dim=-1)


def check_guarantee(shape):
    """The bound documented in ``locality_order``, checked for every level j that fits the grid."""
    perm, _ = locality_order(shape)
    d = len(shape)
    xyz = coords_of(perm, shape)
    for j in range(0, max(shape).bit_length() + 1):
        side = 1 << j
        core = torch.tensor([(n // side) * side for n in shape])
        n_core = int(core.prod())
        inside = (xyz < core).all(-1)
        assert inside[:n_core].all() and not inside[n_core:].any(), (shape, j)
        # [cubes, 2^(d j), d]
        cubes = xyz[:n_core].view(-1, side ** d, d)
        lo, hi = cubes.min(1).values, cubes.max(1).values
        assert (lo % side == 0).all() and (hi - lo == side - 1).all(), (shape, j)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (4, 4), (12, 20), (33, 33), (3, 5, 6), (4, 8, 8)])
def test_round_trip(shape):
    perm, inv = locality_order(shape)
    n = torch.Size(shape).numel()
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    tokens = torch.randn(2, n, 3)
    assert torch.equal(tokens[:, perm][:, inv], tokens)
    assert torch.equal(perm[inv], torch.arange(n))


@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_morton_for_power_of_two_squares(n):
    perm, _ = locality_order((n, n))
    i = torch.arange(n * n)
    # Sequence position i -> (row, col): odd bits of i form the row, even bits the column.
    row = sum(((i >> (2 * b + 1)) & 1) << b for b in range(n.bit_length()))
    col = sum(((i >> (2 * b)) & 1) << b for b in range(n.bit_length()))
    assert torch.equal(perm, row * n + col)


def test_aligned_runs_are_squares_when_sides_are_multiples():
    # 4 divides 12 and 20: every run of 16 tokens is a 4 x 4 patch, every run of 4 a 2 x 2 patch.
    shape = (12, 20)
    xyz = coords_of(locality_order(shape)[0], shape)
    for run, side in ((4, 2), (16, 4)):
        blocks = xyz.view(-1, run, 2)
        extent = blocks.max(1).values - blocks.min(1).values + 1
        assert (extent == side).all()
        assert (blocks.min(1).values % side == 0).all()


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (33, 33), (7, 100), (150, 150), (31, 64), (2, 4, 4),
                                   (3, 6, 10), (5, 16, 16)])
def test_documented_bound(shape):
    check_guarantee(shape)


def test_video_runs_are_boxes():
    shape = (4, 8, 8)
    xyz = coords_of(locality_order(shape)[0], shape)
    # 16 = 2^4 tokens, d = 3: sides 2^1 in (t, h) and 2^2 in w.
    blocks = xyz.view(-1, 16, 3)
    extent = blocks.max(1).values - blocks.min(1).values + 1
    assert (extent == torch.tensor([2, 2, 4])).all()
    cubes = xyz.view(-1, 64, 3)
    assert (cubes.max(1).values - cubes.min(1).values + 1 == 4).all()


def test_cached_results_are_copies_and_large_grids_work():
    perm, _ = locality_order((16, 16))
    perm.zero_()
    assert locality_order((16, 16))[0].unique().numel() == 256
    perm, inv = locality_order((512, 512))
    assert perm.shape == (512 * 512,)
    check_guarantee((96, 160))


@pytest.mark.parametrize("shape", [(4,), (0, 4), (2, 2, 2, 2)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        locality_order(shape)


def test_a_default_device_does_not_leak_into_the_cache():
    with torch.device("meta"):
        perm, _ = locality_order((6, 10))
    assert perm.device.type == "cpu"
    assert torch.equal(perm.sort().values, torch.arange(60))
