"""The baselines' matched K: the same number of attended keys per query as LLSA."""
import pytest

from llsa import keys_per_query
from llsa.attention.budget import matched_topk


def test_paper_settings():
    # 128x128, L=2: 8*16 fine + 8*16 level-1 + 64 level-2 = 320 keys = 20 blocks
    assert matched_topk(128 * 128, block_size=16, topk=8, levels=2) == 20
    # default levels at 128x128 are 2 as well
    assert matched_topk(128 * 128) == 20
    # 256x256, L=2: 128 + 128 + 256 = 512 keys = 32 blocks
    assert matched_topk(256 * 256, block_size=16, topk=8, levels=2) == 32


@pytest.mark.parametrize("n,levels,enrich", [(4096, 1, 1), (65536, 3, 3), (65536, 2, 0), (1000, 1, 1)])
def test_rounds_to_nearest_block_count(n, levels, enrich):
    keys = keys_per_query(n, 16, 8, levels, enrich)
    k = matched_topk(n, block_size=16, topk=8, levels=levels, enrich_levels=enrich)
    assert abs(k * 16 - keys) <= 8


def test_defaults_take_llsa_levels():
    # N=1000: one level (191 keys -> 12 blocks); N=65536: three levels (400 keys -> 25 blocks)
    assert matched_topk(1000) == 12
    assert matched_topk(65536) == 25


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        matched_topk(1024, block_size=1)
