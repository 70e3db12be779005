"""Pass (rewrite): keep only the shard of an all-gathered column-parallel input for backward.

Runs when ``ctx.options.recompute_gathers`` is set (with tp > 1). Reads the
``gather_to_tp`` nodes ``insert_collectives`` made and their users. Where every user of one is a
``linear`` with a weight taking it as input, the gather and those linears become one
``gathered_linears`` node (and a ``getitem`` per linear, with the linear's ``val``,
``fxpar_placement`` and ``fxpar_origin``): forward gathers once and runs every linear; autograd
keeps the shard, not the gathered tensor, and backward gathers it again for the weight gradients
and reduce-scatters the input gradient. This is Megatron's sequence-parallel linear: per
column-parallel block the activation it keeps shrinks from the whole input to 1/tp of it, and it
sends one more all-gather in backward (``fxpar_comm`` of the new node says so).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxpar.metadata import COMM, INPUTS, ORIGIN, PLACEMENT, REQUIRES_GRAD, copy_meta, replace_uses
from fxpar.plan_context import PlanContext
from fxpar.rules import is_weight
from fxpar.ops import collectives as C

aten = torch.ops.aten


def _linear_users(gather: Node) -> list[Node] | None:
    users = list(gather.users)
    for u in users:
        if u.target is not aten.linear.default or u.args[0] is not gather or not is_weight(u.args[1]):
            return None
    return users or None


def recompute_gathers(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    for gather in list(graph.nodes):
        if gather.target is not C.gather_to_tp:
            continue
        linears = _linear_users(gather)
        if linears is None:
            continue
        x, dim, size, runs = gather.args
        weights = [u.args[1] for u in linears]
        biases = [u.args[2] if len(u.args) > 2 else u.kwargs.get("bias") for u in linears]
        with graph.inserting_before(linears[0]):
            fused = graph.call_function(C.gathered_linears, (x, dim, size, runs, weights, biases), dict(gather.kwargs))
        copy_meta(linears[0], fused)
        info = gather.meta[COMM]
        fused.meta.update(
            {
                "val": tuple(u.meta["val"] for u in linears),
                PLACEMENT: tuple(u.meta.get(PLACEMENT) for u in linears),
                INPUTS: {**gather.meta[INPUTS], **{n: p for u in linears for n, p in _inputs(u).items()}},
                REQUIRES_GRAD: any(u.meta.get(REQUIRES_GRAD) for u in linears),
                ORIGIN: None,
                COMM: type(info)(info.kind, info.group, info.elements, info.bytes, 2 * info.bwd_bytes, info.src, info.dst),
            }
        )
        for i, u in enumerate(linears):
            with graph.inserting_after(fused):
                item = graph.call_function(operator.getitem, (fused, i))
            item.meta = dict(u.meta)
            item.meta[INPUTS] = {fused.name: u.meta.get(PLACEMENT)}
            replace_uses(u, item)
            graph.erase_node(u)
        graph.erase_node(gather)
    graph.lint()
    gm.recompile()
    return gm


def _inputs(linear: Node) -> dict:
    """The linear's weight and bias inputs with the placements it took them in."""
    reqs = linear.meta.get(INPUTS) or {}
    return {n.name: reqs[n.name] for n in linear.all_input_nodes if n.name in reqs and n is not linear.args[0]}
