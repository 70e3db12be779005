"""Placements and how a sharded dimension moves through views, cuts and joins."""

import pytest

from fxpar.layout_algebra import concat_layout, piece_layout, view_groups, view_shard
from fxpar.placement import Shard
from fxpar.rules.attention import gqa_layout


def test_shard_validation():
    with pytest.raises(ValueError, match="same number"):
        Shard(0, 4, (((0, 1),), ((1, 4),)))
    with pytest.raises(ValueError, match="outside"):
        Shard(0, 4, (((0, 2),), ((3, 5),)))
    with pytest.raises(ValueError, match="divisible"):
        Shard.even(0, 5, 2)
    assert repr(Shard.even(1, 8, 4)) == "S(1)"
    assert repr(Shard.segmented(2, 12, 2, (4, 8))) == "S(2)[3 seg]"


def test_segmented_layout_splits_each_segment():
    s = Shard.segmented(0, 12, 2, (4, 8))
    assert s.runs == (((0, 2), (4, 6), (8, 10)), ((2, 4), (6, 8), (10, 12)))
    assert s.segment_starts() == (4, 8)


@pytest.mark.parametrize(
    "a, b, groups",
    [
        ((2, 8, 192), (2, 8, 3, 4, 16), [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]),
        ((2, 16, 4, 16), (2, 16, 64), [([0], [0]), ([1], [1]), ([2, 3], [2])]),
        ((6, 4), (4, 6), [([0, 1], [0, 1])]),
        ((1, 4), (4,), [([0, 1], [0])]),
    ],
)
def test_view_groups(a, b, groups):
    assert view_groups(a, b) == groups


def test_heads_split_and_merge_back():
    flat = Shard.even(2, 64, 2)
    heads = view_shard((2, 8, 64), (2, 8, 4, 16), flat)
    assert heads == Shard.even(2, 4, 2)
    assert view_shard((2, 8, 4, 16), (2, 8, 64), heads) == flat


def test_fused_qkv_segments_map_to_heads():
    seg = Shard.segmented(2, 192, 2, (64, 128))
    # view as (3, heads, head_dim): the shard lands on the heads of each of q, k, v
    assert view_shard((2, 8, 192), (2, 8, 3, 4, 16), seg) == Shard.even(3, 4, 2)
    # and an even split of the fused dim is not expressible that way
    assert view_shard((2, 8, 192), (2, 8, 3, 4, 16), Shard.even(2, 192, 2)) is None


def test_a_split_head_is_not_a_single_dim_shard():
    # 2 heads of 16 over 4 ranks: each rank would hold half a head
    assert view_shard((2, 8, 32), (2, 8, 2, 16), Shard.even(2, 32, 4)) is None


def test_repeated_kv_heads_merge_into_query_heads():
    kv = Shard.even(2, 2, 2)  # (B, T, kv=2, rep=2, hd) with kv split
    assert view_shard((2, 16, 2, 2, 16), (2, 16, 4, 16), kv) == Shard.even(2, 4, 2)


def test_pieces_and_concatenation():
    seg = Shard.segmented(0, 12, 2, (4, 8))
    bounds, piece = piece_layout(seg, 4, 8)
    assert bounds == [(2, 4), (2, 4)] and piece == Shard.even(0, 4, 2)
    assert piece_layout(Shard.even(0, 12, 2), 0, 4) is None  # rank 0 would hold all of it
    joined = concat_layout([Shard.even(0, 4, 2), Shard.even(0, 4, 2)], [4, 4], 0)
    assert joined.runs == (((0, 2), (4, 6)), ((2, 4), (6, 8)))


def test_gqa_layout_shares_kv_heads_between_ranks():
    q = Shard.even(1, 8, 4)  # 8 query heads over 4 ranks
    kv = gqa_layout(q, 2)  # 2 key/value heads: ranks 0,1 need head 0; ranks 2,3 head 1
    assert kv.runs == (((0, 1),), ((0, 1),), ((1, 2),), ((1, 2),))
    assert kv.has_duplicates
    assert gqa_layout(Shard.even(1, 8, 2), 4) == Shard.even(1, 4, 2)
