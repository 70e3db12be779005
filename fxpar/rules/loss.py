"""Losses over sharded logits.

Cross-entropy over logits split along the classes (the output of a column-parallel projection
onto the vocabulary) runs split: each rank holds its classes only, and three all-reduces of one
value per sample (maximum, sum of exponentials, target logit) replace gathering the logits,
which at a 128k vocabulary would be the largest tensor of the whole model. Split by samples,
the per-sample losses stay split and their sum is a partial sum (a mean is written as that sum
over the count of targets where the split needs it: ``passes/context_parallel.py``).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from ..ops.local import vocab_parallel_cross_entropy
from .base import RuleContext, Sharding, arg, ndim, replicated
from .registry import localizer, register

aten = torch.ops.aten


def _splittable(node: Node, p) -> bool:
    x = node.args[0]
    classes = 1 if ndim(x) > 1 else 0
    return (
        isinstance(p, Shard)
        and p.dim == classes
        and p.is_even
        and arg(node, 2, "weight") is None
        and not arg(node, 5, "label_smoothing", 0.0)
    )


@register(aten.cross_entropy_loss.default)
def cross_entropy(node: Node, ctx: RuleContext) -> Sharding:
    x, target = node.args[0], node.args[1]
    p = ctx.placement(x)
    if _splittable(node, p):
        return Sharding(REPLICATE, {x: p, target: REPLICATE})
    reduction = arg(node, 3, "reduction", 1)
    if isinstance(p, Shard) and p.dim == 0 and ndim(x) > 1 and reduction in (0, 2) and arg(node, 2, "weight") is None:
        # split by samples (the tokens of context parallelism): each rank's own losses, or their sum
        return Sharding(p if reduction == 0 else PARTIAL, {x: p, target: p})
    reason = "cross_entropy with class weights or label smoothing over split logits" if isinstance(p, Shard) else None
    return replicated(node, ctx, reason=reason)


@localizer(aten.cross_entropy_loss.default)
def local_cross_entropy(node: Node, rank: int, lctx):
    x, target = node.args[0], node.args[1]
    p = lctx.inp(node, x)
    if not _splittable(node, p):
        return None
    (start, stop), = p.runs[rank]
    reduction, ignore = arg(node, 3, "reduction", 1), arg(node, 4, "ignore_index", -100)
    return LocalCall(vocab_parallel_cross_entropy, (x, target, start, stop, reduction, ignore), {"group": "tp"})
