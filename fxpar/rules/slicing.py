"""Ops that take pieces of a dimension or join pieces: split/chunk/slice/narrow/select/unbind,
``getitem`` of their tuple outputs, cat and stack.

Cutting a sharded dimension works when every rank holds an equal, contiguous part of every piece.
When the current layout does not give that (a fused q/k/v projection split into q, k and v after
an even column split), the rule asks for the layout segmented at the cut points; the planner
carries the request back to the weight, which is then stored segment by segment.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..layout_algebra import concat_layout, piece_layout
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
        if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
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


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.narrow.default)
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
        return Sharding(_wrap(node, REPLICATE), {x: REPLICATE}, fallback="cut of a sharded dim with dynamic bounds")
    for layout in _candidate_layouts(p, pieces):
        placed = [piece_layout(layout, a, b) for a, b in pieces]
        if all(pl is not None for pl in placed):
            outs = tuple(pl[1] for pl in placed)
            return Sharding(outs[0] if len(outs) == 1 and node.target in (aten.slice.Tensor, aten.narrow.default) else outs, {x: layout})
    return Sharding(_wrap(node, REPLICATE), {x: REPLICATE}, fallback=f"pieces of the sharded dim {p.dim} are not divisible over ranks")


def _candidate_layouts(p: Shard, pieces):
    yield p
    bounds = set(p.segment_starts())
    for a, b in pieces:
        bounds.update((a, b))
    try:
        yield Shard.segmented(p.dim, p.size, p.world, tuple(sorted(bounds)))
    except ValueError:
        return


@localizer(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def local_split(node: Node, rank: int, lctx):
    x = node.args[0]
    p = lctx.inp(node, x)
    if not isinstance(p, Shard) or p.dim != _cut_dim(node):
        return None
    sizes = []
    for a, b in _pieces(node):
        begin, end = piece_layout(p, a, b)[0][rank]
        sizes.append(end - begin)
    return LocalCall(aten.split_with_sizes.default, (x, sizes, p.dim), {})


@localizer(aten.slice.Tensor, aten.narrow.default)
def local_slice(node: Node, rank: int, lctx):
    x = node.args[0]
    p = lctx.inp(node, x)
    if not isinstance(p, Shard) or p.dim != _cut_dim(node):
        return None
    [(a, b)] = _pieces(node)
    begin, end = piece_layout(p, a, b)[0][rank]
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
    layouts = []
    for n, p, s in zip(ins, places, sizes):
        if isinstance(p, Shard) and p.dim == dim:
            layouts.append(p)
        elif s % lead.world == 0:
            layouts.append(Shard.even(dim, s, lead.world))
        else:
            return Sharding(REPLICATE, {n: REPLICATE for n in tensors}, fallback="cat of pieces not divisible over ranks")
    return Sharding(concat_layout(layouts, sizes, dim), dict(zip(ins, layouts)))


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
