"""Sharding rules for ATen ops, and the per-rank argument rewrites that go with them.

``rule_for(node)`` finds the rule of a node: an explicit registration first, then the generic
pointwise rule for every op tagged ``torch.Tag.pointwise``, then the fallback that runs the op
replicated. ``localizer_for(node)`` finds the function that rewrites a node's size-carrying
arguments for one rank (``view(x, [B, T, 4, 16])`` -> ``view(x, [B, T, 2, 16])``).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .base import FREE, Rule, RuleContext, Sharding  # noqa: F401
from .registry import LOCALIZERS, RULES, fallback


def rule_for(node: Node) -> Rule:
    target = node.target
    if target in RULES:
        return RULES[target]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        from .pointwise import pointwise

        return pointwise
    return fallback


def localizer_for(node: Node):
    return LOCALIZERS.get(node.target)


# importing the rule modules registers them
from . import attention, embedding, loss, matmul, pointwise, reductions, slicing, views  # noqa: E402,F401

aten = torch.ops.aten
# ops through which a weight is still "just the weight": its user may choose how it is stored
WEIGHT_TRANSPARENT = frozenset(views.INVERSES) | {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.contiguous.default,
}
