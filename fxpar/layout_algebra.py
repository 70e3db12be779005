"""How a sharded dimension moves through reshapes and index ranges.

Views regroup dimensions (``(B, T, 3C) -> (B, T, 3, nh, hd)``). Instead of a rule per case, the
placement of a view's output is found by enumeration: for each rank, lay out the global indices of
the elements it holds (in local order), reshape them the way the rank's local view will, and check
that the result is exactly "all of the other dimensions, and a fixed list of indices along one
dimension". If so, that list is the rank's share of the output dimension; if not, no single-dim
shard describes the output and the caller must choose another layout. Only the group of
dimensions that the view merges or splits together with the sharded one is enumerated, so the
cost is the size of that group (e.g. ``n_heads * head_dim``), not of the tensor.
"""

from __future__ import annotations

from functools import lru_cache
from math import prod

import numpy as np
import torch

from .placement import Shard

ENUMERATION_LIMIT = 1 << 24


def size_token(size):
    """An int for a static size, the text of the expression for a symbolic one."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else str(expr)
    return size


def view_groups(a, b):
    """Pair up runs of dimensions of shapes ``a`` and ``b`` that hold the same elements.

    Returns ``[(dims_of_a, dims_of_b), ...]``; a group whose sizes are symbolic and not identical
    is returned as one final group with ``None`` in place of ``b``'s dims.

    >>> view_groups((2, 8, 192), (2, 8, 3, 4, 16))
    [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]
    """
    a = [size_token(x) for x in a]
    b = [size_token(x) for x in b]
    groups: list = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if not (isinstance(pa, int) and isinstance(pb, int)):
                groups.append((gi + list(range(i, len(a))), None))
                return groups
            if pa < pb and i < len(a) and isinstance(a[i], int):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b) and isinstance(b[j], int):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                groups.append((gi + list(range(i, len(a))), None))
                return groups
        groups.append((gi, gj))
    # trailing size-1 dims join the last group
    if groups and (i < len(a) or j < len(b)):
        gi, gj = groups[-1]
        groups[-1] = (gi + list(range(i, len(a))), (gj or []) + list(range(j, len(b))))
    elif not groups:
        groups.append((list(range(len(a))), list(range(len(b)))))
    return groups


def view_shard(in_shape, out_shape, shard: Shard) -> Shard | None:
    """Placement of ``x.view(out_shape)`` when ``x`` (of ``in_shape``) is placed as ``shard``.

    ``None`` when each rank's local view would not be a single-dimension shard of the output.

    >>> s = Shard.even(2, 64, 2)                      # 64 = 4 heads x 16
    >>> view_shard((2, 8, 64), (2, 8, 4, 16), s)      # heads split over ranks
    S(2)
    """
    if [size_token(x) for x in in_shape] == [size_token(x) for x in out_shape]:
        return shard
    for gi, gj in view_groups(in_shape, out_shape):
        if shard.dim not in gi:
            continue
        if gj is None:
            return None
        if shard.is_whole and gj:  # all of it on every rank stays so, along any dim of the group
            size = size_token(out_shape[gj[0]])
            return whole_everywhere(gj[0], size, shard.world) if isinstance(size, int) and size > 0 else None
        sizes_in = [size_token(in_shape[d]) for d in gi]
        sizes_out = [size_token(out_shape[d]) for d in gj]
        real_in = [d for d in gi if size_token(in_shape[d]) != 1]
        real_out = [d for d in gj if size_token(out_shape[d]) != 1]
        if len(real_in) == 1 and len(real_out) == 1 and real_in == [shard.dim]:
            return shard.with_dim(real_out[0])
        if not all(isinstance(s, int) for s in sizes_in + sizes_out) or prod(sizes_in) > ENUMERATION_LIMIT:
            return None
        return _enumerate(tuple(sizes_in), gi.index(shard.dim), tuple(sizes_out), tuple(gj), shard)
    return None


def _local_flat(sizes_in, k, idx):
    grids = [np.arange(s) for s in sizes_in]
    grids[k] = idx
    return np.ravel_multi_index(np.ix_(*grids), sizes_in).reshape(-1)


@lru_cache(maxsize=4096)  # a model's repeated layers ask the same question once per layer
def _enumerate(sizes_in: tuple, k: int, sizes_out: tuple, out_dims: tuple, shard: Shard) -> Shard | None:
    flats = [_local_flat(sizes_in, k, shard.indices(r)) for r in range(shard.world)]
    numel_local = flats[0].size
    for j, size_j in enumerate(sizes_out):
        if size_j == 1:
            continue
        rest = prod(sizes_out) // size_j
        if numel_local % rest:
            continue
        local_shape = list(sizes_out)
        local_shape[j] = numel_local // rest
        owned = []
        for flat in flats:
            coords = np.unravel_index(flat.reshape(local_shape), sizes_out)
            ok = True
            for i, c in enumerate(coords):
                if i == j:
                    continue
                expect = np.arange(local_shape[i]).reshape([-1 if a == i else 1 for a in range(len(local_shape))])
                if not np.array_equal(c, np.broadcast_to(expect, c.shape)):
                    ok = False
                    break
            if not ok:
                break
            cj = coords[j]
            line = cj[tuple(slice(None) if a == j else 0 for a in range(len(local_shape)))]
            if not np.array_equal(cj, np.broadcast_to(line.reshape([-1 if a == j else 1 for a in range(len(local_shape))]), cj.shape)):
                break
            owned.append(line)
        else:
            try:
                return Shard.from_indices(out_dims[j], size_j, owned)
            except ValueError:
                return None
    return None


def piece_layout(shard: Shard, start: int, stop: int):
    """How the piece ``[start, stop)`` of a sharded dimension falls on the ranks.

    Returns ``(local_bounds, piece_shard)``: per rank, the ``(begin, end)`` positions of the piece
    in the rank's local tensor, and the piece's own placement; ``None`` when some rank would hold
    a different number of the piece's elements or hold them non-contiguously.
    """
    local_bounds, owned = [], []
    for r in range(shard.world):
        idx = shard.indices(r)
        pos = np.nonzero((idx >= start) & (idx < stop))[0]
        if pos.size and not np.array_equal(pos, np.arange(pos[0], pos[0] + pos.size)):
            return None
        begin = int(pos[0]) if pos.size else 0
        local_bounds.append((begin, begin + int(pos.size)))
        owned.append(idx[pos] - start)
    if len({e - b for b, e in local_bounds}) != 1 or local_bounds[0][1] == local_bounds[0][0]:
        return None
    return local_bounds, Shard.from_indices(shard.dim, stop - start, owned)


def concat_layout(shards: list[Shard], sizes: list[int], dim: int) -> Shard:
    """Placement of ``cat`` along a sharded dim: each rank concatenates its local pieces."""
    world = shards[0].world
    owned = []
    for r in range(world):
        parts, offset = [], 0
        for s, n in zip(shards, sizes):
            parts.append(s.indices(r) + offset)
            offset += n
        owned.append(np.concatenate(parts))
    return Shard.from_indices(dim, sum(sizes), owned)


def whole_everywhere(dim: int, size: int, world: int) -> Shard:
    """Every rank holds all of ``[0, size)``: a piece of a split tensor that every rank needs whole
    (the key/value part of a fused projection with one key/value head)."""
    return Shard(dim, size, tuple(((0, size),) for _ in range(world)))


def group_layout(dim: int, groups: int, world: int) -> Shard | None:
    """``groups`` (heads, say) over ``world`` ranks: an even split where they divide, else each
    rank holds the group its position falls in (``r * groups // world``), so that ranks share a
    group the way grouped-query attention shares a key/value head; None when neither divides."""
    if groups % world == 0:
        return Shard.even(dim, groups, world)
    if world % groups == 0:
        return Shard.from_indices(dim, groups, [[r * groups // world] for r in range(world)])
    return None


def with_piece(base: Shard, pieces: list[tuple[int, int]], index: int, wanted: Shard) -> Shard | None:
    """A layout of ``base``'s dimension in which piece ``index`` of ``pieces`` (the cuts an op
    makes) comes out as ``wanted`` and every other part keeps its layout in ``base``: evenly
    split where ``base`` gives it no equal part on every rank, whole on every rank where it does
    not divide. None when ``wanted`` does not fit the piece."""
    lo, hi = pieces[index]
    if wanted.size != hi - lo or wanted.world != base.world:
        return None
    edges = sorted({0, base.size, *(x for piece in pieces for x in piece)})
    layouts, sizes = [], []
    for a, b in zip(edges, edges[1:]):
        if (a, b) == (lo, hi):
            part = wanted
        else:
            placed = piece_layout(base, a, b)
            if placed is not None:
                part = placed[1]
            elif (b - a) % base.world == 0:
                part = Shard.even(base.dim, b - a, base.world)
            else:
                part = whole_everywhere(base.dim, b - a, base.world)
        layouts.append(part)
        sizes.append(b - a)
    try:
        return concat_layout(layouts, sizes, base.dim)
    except ValueError:
        return None


def view_superset(in_shape, out_shape, shard: Shard, whole_dims) -> Shard | None:
    """A layout of ``x`` (of ``in_shape``) from which every rank's part of ``x.view(out_shape)``
    under ``shard`` can be picked locally, when no layout gives exactly that part: one dim of the
    group holds the needed indices, and the dims in ``whole_dims`` (broadcast copies, free to hold
    whole) hold all of theirs. ``repeat_kv``'s ``expand`` then ``reshape`` of key/value heads is
    the case: each rank holds the key/value heads its query heads read, with every repeat.

    >>> s = Shard.even(1, 4, 4)                       # 4 query heads, one per rank
    >>> view_superset((2, 2, 2, 8, 16), (2, 4, 8, 16), s, {2}).runs   # 2 kv heads x 2 repeats
    (((0, 1),), ((0, 1),), ((1, 2),), ((1, 2),))
    """
    for gi, gj in view_groups(out_shape, in_shape):
        if shard.dim not in gi:
            continue
        if gj is None:
            return None
        sizes_out = [size_token(out_shape[d]) for d in gi]
        sizes_in = [size_token(in_shape[d]) for d in gj]
        if not all(isinstance(s, int) for s in sizes_out + sizes_in) or prod(sizes_out) > ENUMERATION_LIMIT:
            return None
        owned, dim = [], None
        for r in range(shard.world):
            flat = _local_flat(sizes_out, gi.index(shard.dim), shard.indices(r))
            coords = np.unravel_index(flat, sizes_in)
            partial = [(d, np.unique(c)) for d, c in zip(gj, coords)
                       if d not in whole_dims and np.unique(c).size < sizes_in[gj.index(d)]]
            if not partial:  # the rank needs all of the group: hold it whole on a dim of it
                first = next((d for d in gj if d not in whole_dims), gj[0])
                partial = [(first, np.arange(sizes_in[gj.index(first)]))]
            if len(partial) != 1 or (dim is not None and partial[0][0] != dim):
                return None
            dim = partial[0][0]
            owned.append(partial[0][1])
        try:
            return Shard.from_indices(dim, size_token(in_shape[dim]), owned)
        except ValueError:
            return None
    return None


def holds_all_of(have: Shard, want: Shard) -> bool:
    """Every rank holds (at least) the elements ``want`` gives it: a local pick converts."""
    if have.world != want.world:
        return False
    if have.dim != want.dim:  # whole on every rank, in order, along another dim: all of ``want``'s too
        return all(runs == ((0, have.size),) for runs in have.runs)
    if have.size != want.size:
        return False
    return all(np.isin(want.indices(r), have.indices(r)).all() for r in range(have.world))


def union_layout(a: Shard, b: Shard) -> Shard | None:
    """Each rank holds what ``a`` and what ``b`` give it (in index order): one layout for a value
    two readers need in two layouts; None when the ranks would hold different counts."""
    if a == b:
        return a
    if a.dim != b.dim or a.size != b.size or a.world != b.world:
        return None
    try:
        return Shard.from_indices(a.dim, a.size, [np.union1d(a.indices(r), b.indices(r)) for r in range(a.world)])
    except ValueError:
        return None
