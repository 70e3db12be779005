"""Expert parallelism's dispatch and combine (``fxpar/ops/experts.py``) as tensor
parallelism sees them.

``passes/expert_parallel.py`` puts them into the graph before tensor parallelism is planned.
They move whole rows between the ep ranks, so over the tp ranks they are elementwise in every
other dim: a tp split of the features (an expert's hidden units) or a partial sum (after a
row-parallel expert) passes through. A split of the rows themselves would mix the two groups'
meanings of a row, so such an input is gathered first. Counts and splits are replicated.
"""

from __future__ import annotations

from torch.fx import Node

from ..placement import REPLICATE, Shard
from ..ops import experts as X
from .base import FREE, RuleContext, Sharding
from .registry import register


def _rows(p):
    p = REPLICATE if p is FREE or p is None else p
    return REPLICATE if isinstance(p, Shard) and p.dim == 0 else p


def _common(nodes, ctx: RuleContext):
    ps = {_rows(ctx.placement(n)) for n in nodes}
    return ps.pop() if len(ps) == 1 else REPLICATE


@register(X.dispatch)
def dispatch(node: Node, ctx: RuleContext) -> Sharding:
    x, offs = node.args[0], node.args[1]
    p = _rows(ctx.placement(x))
    return Sharding((p, REPLICATE, REPLICATE), {x: p, offs: REPLICATE})


@register(X.combine)
def combine(node: Node, ctx: RuleContext) -> Sharding:
    y, splits = node.args[0], node.args[1]
    p = _rows(ctx.placement(y))
    return Sharding(p, {y: p, splits: REPLICATE})


@register(X.dispatch_rows)
def dispatch_rows(node: Node, ctx: RuleContext) -> Sharding:
    rows = list(node.args[0])
    p = _common(rows, ctx)
    local = len(node.meta["val"]) - 1
    return Sharding((p,) * local + (REPLICATE,), {r: p for r in rows})


@register(X.combine_rows)
def combine_rows(node: Node, ctx: RuleContext) -> Sharding:
    ys, splits = list(node.args[0]), node.args[1]
    p = _common(ys, ctx)
    return Sharding((p,) * len(node.meta["val"]), {**{y: p for y in ys}, splits: REPLICATE})
