"""Collectives over another mesh dimension, as tensor parallelism sees them.

``passes/context_parallel.py`` turns the captured graph into the program of one ``cp`` rank
before tensor parallelism is planned; its collectives (``group="cp"``) are ops of that graph like
any other. Over the tp ranks they are elementwise in every dim they do not move data along:

* ``all_reduce`` and ``copy_to_tp`` keep any placement (a sum over cp of tp shards or tp partial
  sums is the tp shard or partial sum of the sum);
* ``shard``, ``all_gather`` (and the others that slice or join one ``dim``) keep a tp split of any
  other dim and partial sums; a tp split of ``dim`` itself is gathered first;
* ``redistribute`` between two even splits (Ulysses' all-to-all from sequence- to head-sharded
  and back) keeps a tp split of the heads (each tp rank's heads are divided among the cp ranks)
  when the parts divide evenly, and any split of an untouched dim.
"""

from __future__ import annotations

from torch.fx import Node

from ..placement import REPLICATE, Shard
from ..ops import collectives as C
from .base import FREE, RuleContext, Sharding, arg, ndim, shape, static
from .registry import register


def _given(node: Node, ctx: RuleContext):
    p = ctx.placement(node.args[0])
    return REPLICATE if p is FREE or p is None else p


@register(C.all_reduce, C.copy_to_tp)
def carried(node: Node, ctx: RuleContext) -> Sharding:
    p = _given(node, ctx)
    return Sharding(p, {node.args[0]: p})


@register(C.shard, C.all_gather, C.gather_to_tp, C.reduce_scatter, C.shard_to_partial)
def along_dim(node: Node, ctx: RuleContext) -> Sharding:
    x, p = node.args[0], _given(node, ctx)
    if isinstance(p, Shard) and p.dim == arg(node, 1, "dim"):
        return Sharding(
            REPLICATE, {x: REPLICATE}, fallback=f"tp split of the dim {node.kwargs.get('group')} moves along"
        )
    return Sharding(p, {x: p})


@register(C.redistribute)
def redistributed(node: Node, ctx: RuleContext) -> Sharding:
    x, p = node.args[0], _given(node, ctx)
    src, dst = node.args[1], node.args[4]
    if not isinstance(p, Shard) or p.dim not in (src, dst):
        return Sharding(p, {x: p})
    size = static(shape(node)[p.dim])
    # heads split by tp, then each tp rank's heads by cp (and back): the cp ranks' heads are a
    # relabelling that the second all-to-all undoes, which holds for independent heads only
    # (the ``(B, H, T, D)`` of Ulysses attention), never for positions
    if p.dim == ndim(x) - 3 and p.is_even and size and size % ctx.world == 0:
        return Sharding(Shard.even(p.dim, size, ctx.world), {x: p})
    return Sharding(REPLICATE, {x: REPLICATE}, fallback="tp split of a dim an all-to-all moves, other than heads")
