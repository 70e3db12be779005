"""Placements and how a sharded dimension moves through views, cuts and joins."""

import pytest

from fxpar.layout_algebra import (
    concat_layout, group_layout, holds_all_of, piece_layout, union_layout, view_groups, view_shard, view_superset,
    whole_everywhere, with_piece,
)
from fxpar.rules.slicing import cut_layout
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


def test_one_piece_of_a_fused_dim_changes_alone():
    # q (8) | k (2) | v (2) of a fused projection over 4 ranks: q split, k and v whole everywhere
    base = Shard.even(0, 12, 4)
    k_whole = whole_everywhere(0, 2, 4)
    fused = with_piece(base, [(0, 8), (8, 10), (10, 12)], 1, k_whole)
    # q evenly (the old layout gave no rank an equal part of it), k whole, v whole (2 rows, 4 ranks)
    assert list(fused.indices(1)) == [2, 3, 8, 9, 10, 11]
    assert cut_layout(0, 12, 4, (8, 10)).runs[3] == ((6, 12),)
    assert group_layout(1, 2, 4).runs == (((0, 1),), ((0, 1),), ((1, 2),), ((1, 2),))
    assert group_layout(1, 3, 2) is None


def test_local_picks_and_unions():
    shared = Shard.from_indices(1, 4, [[0, 1], [0, 1], [2, 3], [2, 3]])  # repeats of shared kv heads
    assert holds_all_of(shared, Shard.even(1, 4, 4))
    assert not holds_all_of(Shard.even(1, 4, 4), shared)
    assert holds_all_of(whole_everywhere(3, 16, 4), Shard.even(1, 4, 4))  # whole along another dim
    # two readers of one value, one wanting halves, one every other element: each rank holds both
    both = union_layout(Shard.even(0, 4, 2), Shard.from_indices(0, 4, [[0, 2], [1, 3]]))
    assert both.runs == (((0, 3),), ((1, 4),))
    assert union_layout(Shard.even(0, 4, 2), Shard.from_indices(0, 4, [[0, 1], [0, 1]])) is None  # 2 and 4


def test_a_view_of_repeated_kv_heads_needs_the_heads_the_query_heads_read():
    # (B, kv=2, rep=2, T, D) -> (B, 4, T, D), query heads one per rank: kv head r // 2 on rank r
    need = view_superset((2, 2, 2, 8, 16), (2, 4, 8, 16), Shard.even(1, 4, 4), {2})
    assert need.runs == (((0, 1),), ((0, 1),), ((1, 2),), ((1, 2),))
