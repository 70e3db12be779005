"""The tables of rules and localizers, and the fallback rule."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..placement import REPLICATE
from .base import Rule, RuleContext, Sharding, op_name, replicated

RULES: dict[object, Rule] = {}
LOCALIZERS: dict[object, object] = {}


def register(*ops):
    """Decorator: ``@register(aten.view.default, ...)`` makes the function the ops' rule."""

    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def localizer(*ops):
    """Decorator: ``fn(node, rank, lctx) -> LocalCall | None`` rewrites the op's arguments for one rank."""

    def deco(fn):
        for op in ops:
            LOCALIZERS[op] = fn
        return fn

    return deco


def output_like(node: Node, place):
    """``place`` for a single-tensor output, a tuple of it for multi-output ops, ``None`` for non-tensors."""
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return place
    if isinstance(v, (tuple, list)):
        return tuple(place if isinstance(x, torch.Tensor) else None for x in v)
    return None


def fallback(node: Node, ctx: RuleContext) -> Sharding:
    """Ops with no rule run replicated: sharded inputs are gathered, partial ones reduced."""
    name = op_name(node)
    return replicated(node, ctx, output=output_like(node, REPLICATE), reason=f"no sharding rule for {name}")
