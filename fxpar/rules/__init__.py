"""Sharding rules for ATen ops, and the per-rank argument rewrites that go with them.

``rule_for(node)`` finds the rule of a node: an explicit registration first, then the generic
pointwise rule for every op tagged ``torch.Tag.pointwise``, then the fallback that runs the op
replicated. ``localizer_for(node)`` finds the function that rewrites a node's size-carrying
arguments for one rank (``view(x, [B, T, 4, 16])`` -> ``view(x, [B, T, 2, 16])``).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .base import FREE, Rule, RuleContext, Sharding  # noqa: F401
from .registry import LOCALIZERS, RULES, fallback


def rule_for(node: Node) -> Rule:
    target = node.target
    if target in RULES:
        return RULES[target]
    if isinstance(target, torch._ops.OpOverload) and target.name() in matmul.NAMED_RULES:
        return matmul.NAMED_RULES[target.name()]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        from .pointwise import pointwise

        return pointwise
    return fallback


def localizer_for(node: Node):
    return LOCALIZERS.get(node.target)


# importing the rule modules registers them
from . import (  # noqa: E402,F401
    attention, collectives, conv, embedding, experts, indexing, loss, matmul, pointwise, reductions, slicing, views,
    writes,
)

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
    # context parallelism's all-reduce of a replicated weight's gradient over the cp ranks
    collectives.C.copy_to_tp,
    # the sum of the gradients of rows several tp ranks hold
    collectives.C.sum_duplicates,
}


def is_weight(node: Node) -> bool:
    """Whether ``node`` is a parameter or buffer, possibly viewed, cast or transposed on the way."""
    while node.op == "call_function" and node.target in WEIGHT_TRANSPARENT:
        node = node.args[0]
    return node.op == "get_attr"


class SplitRuleContext:
    """The ``RuleContext`` of a planner that asks rules about activations it splits itself
    (sequence and context parallelism): no column seeds, weights known by ``is_weight``.
    Subclasses say what each node is given (``placement``) and how matmuls may decide."""

    def __init__(self, world: int, user_dep: set[Node]):
        self.world = world
        self.user_dep = user_dep
        self.given: dict = {}  # node -> the placement its readers are given

    def decision(self, node: Node) -> str:
        return "auto"

    def seed_layout(self, node: Node):
        return None

    def user_input_dependent(self, node: Node) -> bool:
        return node in self.user_dep

    def is_weight(self, node: Node) -> bool:
        return is_weight(node)


def user_dependent(gm: GraphModule) -> set[Node]:
    """Nodes whose values (not just shapes) derive from the user's inputs."""
    dep: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dep.add(node)
        elif node.op == "call_function" and _holds_tensors(node) and any(n in dep for n in node.all_input_nodes):
            dep.add(node)
    return dep


def _holds_tensors(node: Node) -> bool:
    """A tensor or a tuple of them (split, getitem of it); sizes (``sym_size``) are shapes, not values."""
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def inverse_of(node: Node):
    """``fn(node, wanted) -> {input: placement} | None``: the input placements that make the
    node's output come out as ``wanted``, for views and elementwise ops; None for other ops."""
    if node.target in views.INVERSES:
        return views.INVERSES[node.target]
    if node.target == aten.cat.default:
        return slicing.invert_cat
    if node.target in writes.WRITES:
        return writes.invert
    if node.target in conv.CONVS:
        return conv.invert_conv
    tags = getattr(node.target, "tags", ())
    if node.target in (collectives.C.copy_to_tp, collectives.C.all_reduce):
        return pointwise.invert
    if torch.Tag.pointwise in tags or node.target in pointwise.EXTRA_ELEMENTWISE or node.target == aten.type_as.default:
        return pointwise.invert
    return None
