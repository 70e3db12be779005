"""Pass (rewrite): collectives begun early and waited for late, where the program has work that
does not depend on them.

Runs last, when ``ctx.options.overlap`` is set (the default). Reads the ``all_reduce``,
``reduce_scatter``, ``all_gather`` and ``gather_to_tp`` nodes of the planned graph, with their
``fxpar_stage`` and ``fxpar_recompute``. A collective with computing nodes that do not read it
between its input and its first reader (the MLP of a block whose attention and MLP both read the
block's input, as GPT-J, GPT-NeoX, Falcon and Phi-2 write it) becomes two nodes: a
``<collective>_start`` just after its input is made and a ``wait`` just before its first reader
(``fxpar/ops/async_collectives.py``). The computing nodes between run while the data travels,
and in backward the conjugate collective of the gradient runs while their backward does.

What it guarantees: the data flow is unchanged (the ``wait`` gives the collective's value to the
same readers), no op that may write in place lies between a start and its wait (nothing changes
a tensor in flight, nor what was read before the start), and a pair stays within one pipeline
stage. A start may move above another collective: the ranks of a group run one program, so
they all begin them in the same new order.
Collectives in a recomputed region stay whole: backward's second forward may stop after a start
and before its wait. The start takes the collective's metadata (``fxpar_comm`` included: the traffic is
counted once); the wait its value and placement. Collectives with no work to hide behind stay as
they are, so the per-rank code shows ``_start``/``wait`` lines only where they overlap
something. The sequence-parallel gathers and reduce-scatters that a matmul reads or writes
overlap inside their fused ops instead (``passes/collective_matmuls.py``).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxpar.metadata import INPUTS, LOCAL, PLACEMENT, RECOMPUTE, REQUIRES_GRAD, STAGE, LocalCall, copy_meta, replace_uses
from fxpar.ops import async_collectives as A
from fxpar.plan_context import PlanContext

STARTS = {sync: start for start, sync in A.SYNC.items()}


def _computes(node: Node) -> bool:
    """Whether ``node`` does work worth hiding a transfer behind: an op making a new tensor with
    elements (not a view, a metadata check or a size)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    if getattr(node.target, "namespace", None) == "fxpar":
        return False  # collectives and fxpar's own ops keep their order with the others
    schema = getattr(node.target, "_schema", None)
    if schema is not None and any(r.alias_info is not None for r in schema.returns):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.numel() > 0


def _mutates(node: Node) -> bool:
    """Whether ``node`` may write to a tensor in place (or is not an op whose effects are known)."""
    if node.target is operator.getitem:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _span(coll: Node, order: list[Node], at: dict[Node, int]) -> tuple[Node, Node] | None:
    """The nodes ``coll``'s start and its wait go before: the start just after its inputs are
    made, the wait just before its first reader, neither across a node of another stage or an op
    that may write in place; None when no computing node lies between."""
    def movable(node):
        return (node.op == "call_function" and not _mutates(node)
                and all(node.meta.get(k) == coll.meta.get(k) for k in (STAGE, RECOMPUTE)))

    inputs = set(coll.all_input_nodes)
    lo = at[coll]
    while lo > 0 and order[lo - 1] not in inputs and movable(order[lo - 1]):
        lo -= 1
    hi, first = at[coll] + 1, min(at[u] for u in coll.users)
    while hi < first and movable(order[hi]):
        hi += 1
    if not any(_computes(n) for n in order[lo:hi] if n is not coll):
        return None
    return order[lo], order[hi]


def _local_calls(coll: Node):
    """The per-rank calls of the start, or None when a rank runs something else there."""
    calls = coll.meta.get(LOCAL)
    if not calls:
        return {}
    if any(c is None or c.target not in STARTS for c in calls.values()):
        return None
    return {r: LocalCall(STARTS[c.target], c.args, c.kwargs) for r, c in calls.items()}


def overlap_collectives(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    stages = ctx.pipeline.stages if ctx.pipeline is not None else []
    where = {name: s for s in stages for name in s.nodes}
    crossing = {name for s in stages for name in (*s.inputs, *s.outputs)}  # values sent between stages
    order: list[Node] = []
    for coll in list(graph.nodes):
        # a recomputed region's forward may stop early in backward, past a start but not its wait
        if (coll.op != "call_function" or coll.target not in STARTS or not coll.users or coll.name in crossing
                or coll.meta.get(RECOMPUTE)):
            continue
        if not order:  # the graph as rewritten so far
            order = list(graph.nodes)
            at = {n: i for i, n in enumerate(order)}
        place = _span(coll, order, at)
        local = _local_calls(coll)
        if place is None or local is None:
            continue
        with graph.inserting_before(place[0]):
            start = graph.call_function(STARTS[coll.target], coll.args, dict(coll.kwargs))
        start.meta = {k: v for k, v in coll.meta.items() if k not in (LOCAL, PLACEMENT)}  # a handle, no value
        start.meta["val"] = coll.meta["val"].new_empty(0) if "val" in coll.meta else None
        if local:
            start.meta[LOCAL] = local
        with graph.inserting_before(place[1]):
            done = graph.call_function(A.wait, (start,))
        copy_meta(coll, done)
        for key in ("val", PLACEMENT, STAGE, RECOMPUTE, REQUIRES_GRAD):
            if key in coll.meta:
                done.meta[key] = coll.meta[key]
        done.meta[INPUTS] = {start.name: coll.meta.get(PLACEMENT)}
        replace_uses(coll, done)
        order = []  # read again before the next collective's span
        stage = where.get(coll.name)
        if stage is not None:
            stage.nodes[stage.nodes.index(coll.name)] = start.name
            stage.nodes.append(done.name)
        graph.erase_node(coll)
    graph.lint()
    gm.recompile()
    return gm
