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

from fxpar.metadata import COMM, INPUTS, ORIGIN, PLACEMENT, RECOMPUTE, REQUIRES_GRAD, STAGE, copy_meta, replace_uses
from fxpar.plan_context import PlanContext
from fxpar.rules import is_weight
from fxpar.ops import collective_matmul as CM
from fxpar.ops import collectives as C

aten = torch.ops.aten


def linear_users(gather: Node) -> list[Node] | None:
    """The users of ``gather``, if every one is a ``linear`` of it by a weight; else None."""
    users = list(gather.users)
    for u in users:
        if u.target is not aten.linear.default or u.args[0] is not gather or not is_weight(u.args[1]):
            return None
    return users or None


def hoist(node, before: Node, order: dict) -> None:
    """Move ``node`` (and what it reads) before ``before`` if it comes after it: a later
    linear's weight, made by an op of its own (a collective of a parameter), read by a fused node
    that takes the place of the first linear."""
    if not isinstance(node, Node) or order[node] < order[before]:
        return
    for inp in node.all_input_nodes:
        hoist(inp, before, order)
    before.prepend(node)
    order[node] = order[before] - 0.5


def fuse_gather(graph, gather: Node, linears: list[Node], keep_gathered: bool, overlap: bool = True) -> Node:
    """Replace ``gather`` and the ``linears`` reading it by one ``gathered_linears`` node and a
    ``getitem`` per linear (which takes over the linear's metadata and users); returns the fused
    node. ``keep_gathered``: what autograd keeps for backward; ``overlap``: whether the op
    computes this rank's tokens while the others' travel (see the op)."""
    x, dim, size, runs = gather.args
    weights = [u.args[1] for u in linears]
    biases = [u.args[2] if len(u.args) > 2 else u.kwargs.get("bias") for u in linears]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for w in [*weights, *biases]:
        hoist(w, linears[0], order)
    with graph.inserting_before(linears[0]):
        fused = graph.call_function(CM.gathered_linears, (x, dim, size, runs, weights, biases, keep_gathered, overlap),
                                    dict(gather.kwargs))
    copy_meta(linears[0], fused)
    info = gather.meta[COMM]
    bwd = info.bwd_bytes if keep_gathered else 2 * info.bwd_bytes
    fused.meta.update(
        {
            "val": tuple(u.meta["val"] for u in linears),
            PLACEMENT: tuple(u.meta.get(PLACEMENT) for u in linears),
            INPUTS: {**gather.meta[INPUTS], **{n: p for u in linears for n, p in _inputs(u).items()}},
            REQUIRES_GRAD: any(u.meta.get(REQUIRES_GRAD) for u in linears),
            ORIGIN: None,
            COMM: type(info)(info.kind, info.group, info.elements, info.bytes, bwd, info.src, info.dst),
        }
    )
    for key in (STAGE, RECOMPUTE):
        if key in linears[0].meta:
            fused.meta[key] = linears[0].meta[key]
    for i, u in enumerate(linears):
        with graph.inserting_after(fused):
            item = graph.call_function(operator.getitem, (fused, i))
        item.meta = dict(u.meta)
        item.meta[INPUTS] = {fused.name: u.meta.get(PLACEMENT)}
        replace_uses(u, item)
        graph.erase_node(u)
    graph.erase_node(gather)
    return fused


def recompute_gathers(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    for gather in list(graph.nodes):
        if gather.target is not C.gather_to_tp:
            continue
        linears = linear_users(gather)
        if linears is not None:
            fuse_gather(graph, gather, linears, keep_gathered=False, overlap=ctx.options.overlap)
    graph.lint()
    gm.recompile()
    return gm


def _inputs(linear: Node) -> dict:
    """The linear's weight and bias inputs with the placements it took them in."""
    reqs = linear.meta.get(INPUTS) or {}
    return {n.name: reqs[n.name] for n in linear.all_input_nodes if n.name in reqs and n is not linear.args[0]}
