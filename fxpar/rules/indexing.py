"""Ops that pick rows by index (``x[idx]``) or add rows at given indices (``index_add``: how a
mixture of experts adds each expert's weighted output back to the tokens that chose it).

Both are linear in the tensor they read rows of, so a partial sum stays one: picking rows of a
partial sum is the partial sum of the picked rows.

``out = self.index_add(dim, index, source)`` is linear in ``self`` and ``source`` together, so a
partial ``source`` (the row-parallel output of a tensor-parallel expert) keeps the sum partial,
with ``self`` taken as one rank's part of it: the experts of a layer then share one all-reduce
after the last of them instead of one each. A shard along another dim than ``dim`` passes
through when ``self`` and ``source`` are split alike.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..placement import PARTIAL, REPLICATE, Shard
from .base import RuleContext, Sharding, arg, ndim, norm_dim, replicated, tensor_args
from .registry import register

aten = torch.ops.aten


@register(aten.index_add.default, aten.index_add_.default)
def index_add(node: Node, ctx: RuleContext) -> Sharding:
    base, index, source = node.args[0], node.args[2], node.args[3]
    dim = norm_dim(arg(node, 1, "dim"), ndim(base))
    pb, ps = ctx.placement(base), ctx.placement(source)
    if pb is PARTIAL or ps is PARTIAL:
        return Sharding(PARTIAL, {base: PARTIAL, source: PARTIAL, index: REPLICATE})
    for p in (pb, ps):
        if isinstance(p, Shard) and p.dim != dim and p.is_partition:
            return Sharding(p, {base: p, source: p, index: REPLICATE})
    return Sharding(REPLICATE, {n: REPLICATE for n in tensor_args(node)})


@register(aten.index.Tensor)
def index(node: Node, ctx: RuleContext) -> Sharding:
    x, indices = node.args[0], [i for i in node.args[1] if isinstance(i, Node)]
    p = ctx.placement(x)
    if p is PARTIAL and x not in indices and all(ctx.placement(i) is not PARTIAL for i in indices):
        return Sharding(PARTIAL, {x: PARTIAL, **{i: REPLICATE for i in indices}})
    given = [d for d, i in enumerate(node.args[1]) if i is not None]
    if isinstance(p, Shard) and len(given) == 1 and p.dim != given[0] and x not in indices:
        # rows picked along another dim (each token's expert output): the split dim stays split
        k, idx = given[0], node.args[1][given[0]]
        dim = p.dim if p.dim < k else p.dim + ndim(idx) - 1
        return Sharding(p.with_dim(dim), {x: p, idx: REPLICATE})
    return replicated(node, ctx, reason="index of a sharded tensor")
