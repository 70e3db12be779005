"""Ops that write values into a tensor at given positions, in place or not: how a key/value cache
is filled (``cache.index_copy_(2, pos, k)`` in Hugging Face's static cache, ``cache[:, :, pos] = k``
in gpt-fast, which is ``index_put_``, ``cache[:, :, a:b].copy_(k)``).

Along every dim the op does not index, the written tensor is laid out like the values written
into it: a cache of key heads written by a column-parallel projection holds each rank's heads
only, in the projection's layout (grouped-query heads shared by several ranks included), so the
cache costs 1/tp of its size per rank and filling it moves nothing. A tensor already stored split
(the cache a prefill program placed, read again by the decode program) keeps its layout, and the
values are brought to it.

An op that writes in place into a buffer or an input must write where it lives:
``insert_collectives`` refuses to convert such a tensor for the write (a gathered copy would take
the write and lose it).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..placement import REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, arg, ndim, norm_dim, shape, tensor_args
from .registry import register

aten = torch.ops.aten

INDEX_COPY = (aten.index_copy_.default, aten.index_copy.default)
INDEX_PUT = (aten.index_put_.default, aten.index_put.default)
WRITES = frozenset(INDEX_COPY + INDEX_PUT + (aten.copy_.default,))


def written(node: Node) -> tuple[Node, Node, set[int], int] | None:
    """``(tensor written into, values, dims indexed, dims the values lack)`` of a write; None where
    the values do not line up with the tensor (an index of several dims). Values broadcast from the
    right, as ``x[:, pos] = v`` passes them with their leading size-1 dims dropped."""
    base = node.args[0]
    if node.target in INDEX_COPY:
        source = arg(node, 3, "source")
        dims = {norm_dim(arg(node, 1, "dim"), ndim(base))}
    elif node.target in INDEX_PUT:
        source = arg(node, 2, "values")
        indices = arg(node, 1, "indices")
        given = [d for d, i in enumerate(indices) if i is not None]
        if len(given) != 1 or ndim(indices[given[0]]) != 1:
            return None
        dims = set(given)
    else:
        source, dims = node.args[1], set()
    if not isinstance(source, Node) or ndim(source) > ndim(base):
        return None
    return base, source, dims, ndim(base) - ndim(source)


@register(*WRITES)
def write(node: Node, ctx: RuleContext) -> Sharding:
    found = written(node)
    if found is None:
        return Sharding(REPLICATE, {n: REPLICATE for n in tensor_args(node)})
    base, source, dims, lack = found
    indices = {n: REPLICATE for n in tensor_args(node) if n is not base and n is not source}
    pb, ps = ctx.placement(base), ctx.placement(source)
    # how the tensor is stored decides; a tensor not yet placed (a cache) takes the values' layout
    taken = [pb if isinstance(pb, Shard) else None]
    if pb is FREE or node.target is not aten.copy_.default:
        taken.append(ps.with_dim(ps.dim + lack) if isinstance(ps, Shard) else None)
    for p in taken:
        if p is None or p.dim in dims or p.dim < lack or shape(base)[p.dim] != shape(source)[p.dim - lack]:
            continue
        return Sharding(p, {base: p, source: p.with_dim(p.dim - lack), **indices})
    # whole on every rank (a tensor stored split along an indexed dim is then refused where the
    # write would need it gathered: insert_collectives)
    return Sharding(REPLICATE, {base: REPLICATE, source: REPLICATE, **indices})


def invert(node: Node, wanted) -> dict | None:
    """The values must come in the layout the written tensor is wanted in (a layout request for
    the cache goes to the projection that makes what is written)."""
    found = written(node)
    if found is None or not isinstance(wanted, Shard) or wanted.dim in found[2] or wanted.dim < found[3]:
        return None
    return {found[1]: wanted.with_dim(wanted.dim - found[3])}


def mutated_state(node: Node) -> list[Node]:
    """The inputs an op writes into (``self`` of ``index_copy_``, ``copy_``, ``add_``, ..., from
    its schema) that outlive the program: a buffer or an input, or a view of one. A write into
    an activation may go to a converted copy, since later ops read the write's result."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, Node) and _base(v).op in ("get_attr", "placeholder"):
                out.append(v)
    return out


def _base(node: Node) -> Node:
    """The tensor ``node`` is a view of (itself if none)."""
    while node.op == "call_function" and getattr(node.target, "is_view", False) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node
