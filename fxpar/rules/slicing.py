"""Ops that take pieces of a dimension or join pieces: split/chunk/tensor_split/slice/narrow/select/unbind,
``getitem`` of their tuple outputs, cat and stack.

Cutting a sharded dimension works when every rank holds an equal, contiguous part of every piece.
When the current layout does not give that (a fused q/k/v projection split into q, k and v after
an even column split), the rule asks for the layout segmented at the cut points; the planner
carries the request back to the weight, which is then stored segment by segment.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from ..layout_algebra import concat_layout, piece_layout, whole_everywhere, with_piece
from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, arg, ndim, norm_dim, shape, static, tensor_args
from .registry import localizer, register

aten = torch.ops.aten
INT_MAX = 2**62


def _pieces(node: Node) -> list[tuple[int, int]] | None:
    """The ``[start, stop)`` of each output piece along the cut dim, for static sizes."""
    x = node.args[0]
    t = node.target
    nd = ndim(x)
    if t == aten.split.Tensor:
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        size = static(shape(x)[dim])
        step = node.args[1]
        if size is None or not isinstance(step, int):
            return None
        return [(a, min(a + step, size)) for a in range(0, size, step)]
    if t == aten.split_with_sizes.default:
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        sizes = node.args[1]
        if not all(isinstance(s, int) for s in sizes):
            return None
        out, a = [], 0
        for s in sizes:
            out.append((a, a + s))
            a += s
        return out
    if t == aten.tensor_split.indices:
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        size = static(shape(x)[dim])
        if size is None or not all(isinstance(i, int) for i in node.args[1]):
            return None
        edges = [0] + [min(max(0, i + size if i < 0 else i), size) for i in node.args[1]] + [size]
        return [(a, max(a, b)) for a, b in zip(edges, edges[1:])]
    if t == aten.tensor_split.sections:
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        size, n = static(shape(x)[dim]), node.args[1]
        if size is None or not isinstance(n, int):
            return None
        q, extra = divmod(size, n)
        out, a = [], 0
        for k in range(n):
            out.append((a, a + q + (k < extra)))
            a += q + (k < extra)
        return out
    if t == aten.chunk.default:
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        size = static(shape(x)[dim])
        if size is None:
            return None
        step = -(-size // node.args[1])
        return [(a, min(a + step, size)) for a in range(0, size, step)]
    if t in (aten.slice.Tensor, aten.narrow.default):
        dim = norm_dim(arg(node, 1, "dim", 0), nd)
        size = static(shape(x)[dim])
        if size is None:
            return None
        if t == aten.narrow.default:
            start, length = node.args[2], node.args[3]
            if not isinstance(start, int) or not isinstance(length, int):
                return None
            start = max(0, start + size) if start < 0 else start
            return [(start, start + length)]
        start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
        if step != 1:
            return None
        if not all(isinstance(v, (int, type(None))) for v in (start, end)):
            # symbolic bounds of a dim of static size: the static size of the piece places it
            # when one end is known (``x[..., :n]`` with n a size that equals the piece's)
            out = static(shape(node)[dim])
            if out is None:
                return None
            if isinstance(start, (int, type(None))):
                a = 0 if start is None else (max(0, start + size) if start < 0 else min(start, size))
                return [(a, a + out)]
            if end is None or (isinstance(end, int) and end >= INT_MAX):
                return [(size - out, size)]
            return None
        start = 0 if start is None else (max(0, start + size) if start < 0 else min(start, size))
        end = size if end is None or end >= INT_MAX else (max(0, end + size) if end < 0 else min(end, size))
        return [(start, max(start, end))]
    return None


def _cut_dim(node: Node) -> int:
    t = node.target
    if t in (aten.slice.Tensor, aten.narrow.default):
        return norm_dim(arg(node, 1, "dim", 0), ndim(node.args[0]))
    return norm_dim(arg(node, 2, "dim", 0), ndim(node.args[0]))


def _wrap(node: Node, place):
    single = node.target in (aten.slice.Tensor, aten.narrow.default)
    return place if single else tuple(place for _ in node.meta["val"])


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.indices,
          aten.tensor_split.sections, aten.slice.Tensor, aten.narrow.default)
def cut(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    if p is PARTIAL:
        return Sharding(_wrap(node, PARTIAL), {x: PARTIAL})
    if not isinstance(p, Shard):
        return Sharding(_wrap(node, REPLICATE), {x: REPLICATE})
    if p.dim != _cut_dim(node):
        return Sharding(_wrap(node, p), {x: p})
    pieces = _pieces(node)
    if pieces is None:
        strided = node.target == aten.slice.Tensor and arg(node, 4, "step", 1) != 1
        if strided:
            picked = strided_layout(node, p)
            if picked is not None:
                return Sharding(picked[1], {x: p})
        why = "strided slice of the sharded dim, not every other element of each rank's part" if strided \
            else "cut of a sharded dim with dynamic bounds"
        return Sharding(_wrap(node, REPLICATE), {x: REPLICATE}, fallback=why)
    # the pieces the other cuts of the same tensor take too (q, k and v cut by three slices):
    # one layout cut at all of their bounds serves all of them
    for layout in _candidate_layouts(p, pieces + cuts_of(x, p.dim)):
        # an empty piece (the pass-through part of a rotary over every dim) holds nothing
        placed = [piece_layout(layout, a, b) if b > a else ([(0, 0)] * p.world, REPLICATE) for a, b in pieces]
        if all(pl is not None for pl in placed):
            outs = tuple(pl[1] for pl in placed)
            return Sharding(outs[0] if len(outs) == 1 and node.target in (aten.slice.Tensor, aten.narrow.default) else outs, {x: layout})
    return Sharding(_wrap(node, REPLICATE), {x: REPLICATE}, fallback=f"pieces of the sharded dim {p.dim} are not divisible over ranks")


def _candidate_layouts(p: Shard, pieces):
    yield p
    bounds = set(p.segment_starts())
    for a, b in [piece for piece in pieces if piece[1] > piece[0]]:
        bounds.update((a, b))
    try:
        yield Shard.segmented(p.dim, p.size, p.world, tuple(sorted(bounds)))
        return
    except ValueError:
        pass
    yield cut_layout(p.dim, p.size, p.world, bounds)


def strided_layout(node: Node, p: Shard):
    """``(local (start, stop, step) per rank, output layout)`` of ``x[..., a:b:k]`` when every rank
    holds the same number of the picked elements, ``k`` apart in its local tensor (gate and up
    interleaved in one projection, split evenly); None otherwise."""
    size = static(shape(node.args[0])[p.dim])
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    if size is None or not all(isinstance(v, (int, type(None))) for v in (start, end)) or not isinstance(step, int):
        return None
    a = 0 if start is None else (max(0, start + size) if start < 0 else min(start, size))
    b = size if end is None or end >= INT_MAX else (max(0, end + size) if end < 0 else min(end, size))
    local, owned = [], []
    for r in range(p.world):
        idx = p.indices(r)
        pos = np.nonzero((idx >= a) & (idx < b) & ((idx - a) % step == 0))[0]
        if not pos.size or not np.array_equal(pos, pos[0] + step * np.arange(pos.size)):
            return None
        local.append((int(pos[0]), int(pos[-1]) + 1, step))
        owned.append((idx[pos] - a) // step)
    try:
        return local, Shard.from_indices(p.dim, static(shape(node)[p.dim]), owned)
    except ValueError:
        return None


def cut_layout(dim: int, size: int, world: int, bounds) -> Shard:
    """``[0, size)`` cut at ``bounds``, each piece split evenly where it divides over the ranks
    and whole on every rank where it does not (the one key/value head of multi-query attention
    next to the query heads)."""
    edges = sorted(set(bounds) | {0, size})
    parts = [Shard.even(dim, b - a, world) if (b - a) % world == 0 else whole_everywhere(dim, b - a, world)
             for a, b in zip(edges, edges[1:])]
    return concat_layout(parts, [b - a for a, b in zip(edges, edges[1:])], dim)


def cuts_of(x: Node, dim: int) -> list[tuple[int, int]]:
    """The non-empty pieces that the cuts reading ``x`` along ``dim`` take."""
    return [piece for user in x.users if user.target in CUTS and user.args[0] is x and _cut_dim(user) == dim
            for piece in (_pieces(user) or []) if piece[1] > piece[0]]


CUTS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.indices,
        aten.tensor_split.sections, aten.slice.Tensor, aten.narrow.default)
_SINGLE = (aten.slice.Tensor, aten.narrow.default)


def invert_cut(node: Node, wanted: Shard, base):
    """``(x, layout)``: the layout of the cut tensor ``x`` that makes ``node`` (a slice of ``x``,
    or one piece of a split of it) come out as ``wanted``, keeping the other pieces as ``base``
    (the layout ``x`` has now) places them; None when ``node`` is no cut. A request that reaches
    one segment of a fused projection (the key/value part of q/k/v) changes that segment only."""
    if node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0].target in CUTS:
        cut, index = node.args[0], node.args[1]
    elif node.target in _SINGLE:
        cut, index = node, 0
    else:
        return None
    x = cut.args[0]
    if wanted.dim != _cut_dim(cut):
        return x, wanted
    pieces = _pieces(cut)
    if pieces is None or not isinstance(base, Shard) or base.dim != wanted.dim:
        return None
    layout = with_piece(base, pieces, index, wanted)
    return None if layout is None else (x, layout)


@localizer(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.indices,
           aten.tensor_split.sections)
def local_split(node: Node, rank: int, lctx):
    x = node.args[0]
    p = lctx.inp(node, x)
    if not isinstance(p, Shard) or p.dim != _cut_dim(node):
        return None
    sizes = []
    for a, b in _pieces(node):
        begin, end = piece_layout(p, a, b)[0][rank] if b > a else (0, 0)
        sizes.append(end - begin)
    return LocalCall(aten.split_with_sizes.default, (x, sizes, p.dim), {})


@localizer(aten.slice.Tensor, aten.narrow.default)
def local_slice(node: Node, rank: int, lctx):
    x = node.args[0]
    p = lctx.inp(node, x)
    if not isinstance(p, Shard) or p.dim != _cut_dim(node):
        return None
    if arg(node, 4, "step", 1) != 1:
        begin, end, step = strided_layout(node, p)[0][rank]
        return LocalCall(aten.slice.Tensor, (x, p.dim, begin, end, step), {})
    [(a, b)] = _pieces(node)
    begin, end = piece_layout(p, a, b)[0][rank] if b > a else (0, 0)
    return LocalCall(aten.slice.Tensor, (x, p.dim, begin, end), {})


@register(operator.getitem)
def getitem(node: Node, ctx: RuleContext) -> Sharding:
    parent, index = node.args
    p = ctx.placement(parent)
    if isinstance(p, tuple):
        return Sharding(p[index], {})
    return Sharding(REPLICATE if p in (None, FREE) else p, {})


@register(aten.select.int)
def select(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    dim = norm_dim(node.args[1], ndim(x))
    if p is PARTIAL:
        return Sharding(PARTIAL, {x: PARTIAL})
    if isinstance(p, Shard) and p.dim != dim:
        return Sharding(p.with_dim(p.dim - (p.dim > dim)), {x: p})
    return Sharding(REPLICATE, {x: REPLICATE}, fallback="select on the sharded dim" if isinstance(p, Shard) else None)


@register(aten.unbind.int)
def unbind(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    dim = norm_dim(arg(node, 1, "dim", 0), ndim(x))
    n = len(node.meta["val"])
    if p is PARTIAL:
        return Sharding((PARTIAL,) * n, {x: PARTIAL})
    if isinstance(p, Shard) and p.dim != dim:
        return Sharding((p.with_dim(p.dim - (p.dim > dim)),) * n, {x: p})
    return Sharding((REPLICATE,) * n, {x: REPLICATE}, fallback="unbind of the sharded dim" if isinstance(p, Shard) else None)


@register(aten.cat.default)
def cat(node: Node, ctx: RuleContext) -> Sharding:
    ins = [n for n in node.args[0]]
    tensors = tensor_args(node)
    nd = ndim(node)
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    places = [ctx.placement(n) for n in ins]
    if places and all(p is PARTIAL for p in places):
        return Sharding(PARTIAL, {n: PARTIAL for n in tensors})
    sharded = [p for p in places if isinstance(p, Shard)]
    if not sharded:
        return Sharding(REPLICATE, {n: REPLICATE for n in tensors})
    lead = sharded[0]
    if lead.dim != dim:
        return Sharding(lead, {n: lead for n in tensors})
    sizes = [static(shape(n)[dim]) for n in ins]
    if any(s is None for s in sizes):
        return Sharding(REPLICATE, {n: REPLICATE for n in tensors}, fallback="cat of a sharded dim with dynamic sizes")
    layouts, inputs = [], {}
    for n, p, s in zip(ins, places, sizes):
        if s == 0:  # an empty piece (the pass-through part of a rotary over every dim) holds nothing
            inputs[n] = REPLICATE
            continue
        if isinstance(p, Shard) and p.dim == dim:
            layouts.append(p)
        elif s % lead.world == 0:
            layouts.append(Shard.even(dim, s, lead.world))
        else:
            return Sharding(REPLICATE, {n: REPLICATE for n in tensors}, fallback="cat of pieces not divisible over ranks")
    kept = [n for n, s in zip(ins, sizes) if s]
    inputs.update(zip(kept, layouts))
    return Sharding(concat_layout(layouts, [s for s in sizes if s], dim), inputs)


def invert_cat(node: Node, wanted):
    """The input layouts that make ``cat`` come out as ``wanted``: along the cat dim, each input
    its own stretch of ``wanted`` (None when a rank's part of it is not one contiguous block of
    its local tensor); along another dim, ``wanted`` for every input."""
    ins = list(node.args[0])
    if not isinstance(wanted, Shard):
        return {n: wanted for n in ins}
    dim = norm_dim(arg(node, 1, "dim", 0), ndim(node))
    if wanted.dim != dim:
        return {n: wanted for n in ins}
    sizes = [static(shape(n)[dim]) for n in ins]
    if any(s is None for s in sizes):
        return None
    out, start = {}, 0
    for n, size in zip(ins, sizes):
        if size:
            placed = piece_layout(wanted, start, start + size)
            if placed is None:
                return None
            out[n] = placed[1]
        start += size
    return out


@register(aten.stack.default)
def stack(node: Node, ctx: RuleContext) -> Sharding:
    ins = list(node.args[0])
    dim = norm_dim(arg(node, 1, "dim", 0), ndim(node))
    places = [ctx.placement(n) for n in ins]
    if places and all(p is PARTIAL for p in places):
        return Sharding(PARTIAL, {n: PARTIAL for n in ins})
    lead = next((p for p in places if isinstance(p, Shard)), None)
    if lead is None:
        return Sharding(REPLICATE, {n: REPLICATE for n in ins})
    return Sharding(lead.with_dim(lead.dim + (lead.dim >= dim)), {n: lead for n in ins})


@register(aten.index_select.default)
def index_select(node: Node, ctx: RuleContext) -> Sharding:
    x, dim, idx = node.args[0], node.args[1], node.args[2]
    p = ctx.placement(x)
    dim = norm_dim(dim, ndim(x))
    if isinstance(p, Shard) and p.dim != dim:
        return Sharding(p, {x: p, idx: REPLICATE})
    return Sharding(REPLICATE, {x: REPLICATE, idx: REPLICATE}, fallback="index_select on the sharded dim" if isinstance(p, Shard) else None)
