"""Pass (rewrite): with context parallelism, a mean cross-entropy as a sum over a count.

Runs before the context-parallel steps, when the mesh has ``cp > 1``. Reads
``val``; rewrites every ``cross_entropy_loss`` with the mean reduction, no class weights and
class indices as targets into

    cross_entropy(x, t, reduction="sum", ignore_index, label_smoothing) / (t != ignore_index).sum()

and gives the new nodes ``val``, ``stack_trace`` and ``nn_module_stack`` of the one they replace.
It is the same value (torch's mean, with label smoothing too, divides by the number of targets
that are not ignored; all ignored gives nan in both). Why: split by tokens over the cp ranks, a
mean is not a sum of the ranks' means (each rank ignores a different number of targets), but a
sum is a partial sum, so each rank's losses stay on its own tokens instead of gathering the
logits. The count comes from the targets, which are small and given whole.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from fxpar.fake_values import fake_mode
from fxpar.metadata import copy_meta
from fxpar.plan_context import PlanContext
from fxpar.rules.base import arg, ndim


aten = torch.ops.aten


def split_loss_means(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.cross_entropy_loss.default or arg(node, 3, "reduction", 1) != 1:
            continue
        if arg(node, 2, "weight") is not None or ndim(node.args[1]) == ndim(node.args[0]):
            continue  # class weights, or probabilities as targets: a weighted mean, left whole
        x, t = node.args[0], node.args[1]
        ignore = arg(node, 4, "ignore_index", -100)
        smoothing = arg(node, 5, "label_smoothing", 0.0)
        with graph.inserting_before(node):
            total = graph.call_function(aten.cross_entropy_loss.default, (x, t, None, 2, ignore, smoothing))
            valid = graph.call_function(aten.ne.Scalar, (t, ignore))
            count = graph.call_function(aten.sum.default, (valid,))
            mean = graph.call_function(aten.div.Tensor, (total, count))
        with fake_mode(gm):
            for new in (total, valid, count, mean):
                vals = map_aggregate(new.args, lambda a: a.meta["val"] if isinstance(a, Node) else a)
                new.meta["val"] = new.target(*vals)
                copy_meta(node, new)
        node.replace_all_uses_with(mean)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
