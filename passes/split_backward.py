"""Pass (analysis): which ops' weight gradients a zero-bubble schedule runs apart, as W.

Runs where the schedule splits backward (``schedule="zbh1"``, ``"zbv"``), after every pass that
adds or moves ops. Reads the stages of ``ctx.pipeline``, ``fxpar_recompute``, ``fxpar_memory``
and ``fxpar_requires_grad``. Writes ``fxpar_deferred`` on each chosen op (the flat positions of
its weight operands in ``(args, kwargs)``) and, per stage, ``StageMemory.deferred`` (the bytes W
keeps per microbatch) with ``deferred_in_flight`` (the most microbatches between B and W).

An op is chosen from the graph's data flow, never from names: a contraction (matmul, linear,
convolution, einsum of two operands) of an activation by a weight, where the weight is a
trainable parameter or a view of one and the op is linear in it. Its weight gradient (a second
GEMM as large as the forward) then reads only the activation and the output's gradient, never
the weight, so it can wait while B hands the input gradients on (``fxpar/runtime/deferred.py``
runs it). A weight read through ``gather_params`` counts where its whole copy is kept between
steps (``precision``, zero 1: the gather's backward then runs once in B for the layer's other
weights and once per deferred op in W, summing or casting each part alike). Left in B: ops in a
recomputed region (their forward is remade inside backward), weights gathered for each use or
whose gradient is reduce-scattered at once (zero 2 and 3, offload: one collective per layer
would become one per op); small weight gradients (norms, biases of other ops) cost too little to
move. A plan where no op is left to defer is an error that says why.

W keeps, per microbatch, the storage of each chosen op's activation input and its output's
gradient (the size of its output); nothing else of the microbatch outlives B.

``defer_weight_grads`` applies the marks to a rank's program: each marked op is called through
``fxpar.runtime.deferred.later``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from fxpar import schedule as sched
from fxpar.errors import PlanError
from fxpar.memory import node_memory
from fxpar.metadata import DEFERRED, LOCAL, RECOMPUTE, REQUIRES_GRAD
from fxpar.ops.params import gather_params
from fxpar.plan_context import PlanContext
from fxpar.runtime.deferred import later

aten = torch.ops.aten
# op -> (flat positions of its two contracted operands, of an added bias)
CONTRACTIONS = {
    aten.linear.default: ((0, 1), (2,)),
    aten.mm.default: ((0, 1), ()),
    aten.matmul.default: ((0, 1), ()),
    aten.bmm.default: ((0, 1), ()),
    aten.addmm.default: ((1, 2), (0,)),
    aten.baddbmm.default: ((1, 2), (0,)),
    aten.conv1d.default: ((0, 1), (2,)),
    aten.conv2d.default: ((0, 1), (2,)),
    aten.conv3d.default: ((0, 1), (2,)),
    aten.convolution.default: ((0, 1), (2,)),
    aten.einsum.default: ((1, 2), ()),  # (equation, [a, b]) flattens to equation, a, b
}


def split_backward(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    spec = ctx.pipeline
    schedule = sched.make(ctx.options.schedule, ctx.mesh.pp, ctx.options.microbatches, ctx.options.virtual)
    pending = schedule.weight_pending()
    in_flight = schedule.in_flight()
    by_name = {n.name: n for n in gm.graph.nodes}
    through = gathers_kept(ctx)
    total = 0
    for s in spec.stages:
        nodes = [by_name[name] for name in s.nodes]
        for node in nodes:
            weights = deferrable(node, through)
            if weights is None:
                node.meta.pop(DEFERRED, None)
            else:
                node.meta[DEFERRED] = weights
                total += 1
        s.memory.in_flight = in_flight[s.index]
        s.memory.deferred = deferred_bytes(nodes, by_name, marked=True)
        s.memory.deferred_in_flight = pending[s.index] if s.memory.deferred else 0
    if not total:
        raise PlanError(_why_none(gm, ctx))
    return gm


def deferred_keeps(node: Node, marked: bool = False) -> tuple[object, tuple[str, ...]]:
    """What W keeps of ``node`` if its weight gradient waits (``marked``: if it is marked, else
    if it could be): the bytes of its output's gradient, and the storages of its activation
    inputs (by root name)."""
    weights = node.meta.get(DEFERRED) if marked else deferrable(node, True)
    if weights is None:
        return 0, ()
    flat = pytree.tree_flatten((node.args, node.kwargs))[0]
    roots = tuple(node_memory(a).root or a.name for i, a in enumerate(flat) if isinstance(a, Node) and i not in weights)
    return node_memory(node).value_bytes, roots


def deferred_bytes(nodes: list[Node], by_name: dict, marked: bool = False):
    """What one microbatch of a stage made of ``nodes`` keeps between B and W: each deferred op's
    output gradient, and each activation storage they read once."""
    kept, roots = 0, set()
    for node in nodes:
        out, reads = deferred_keeps(node, marked)
        kept += out
        for r in reads:
            if r not in roots and r in by_name:
                roots.add(r)
                kept += node_memory(by_name[r]).out_bytes
    return kept


def gathers_kept(ctx: PlanContext) -> bool:
    """Whether weights read through ``gather_params`` keep their whole copy between steps and
    take their gradient in parts (zero 0 or 1, nothing offloaded)."""
    return ctx.options.zero <= 1 and ctx.options.offload is None


def _why_none(gm: GraphModule, ctx: PlanContext) -> str:
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONTRACTIONS]
    recomputed = sum(1 for n in matmuls if RECOMPUTE in n.meta)
    gathered = sum(1 for n in matmuls if RECOMPUTE not in n.meta and deferrable(n, True) and not deferrable(n, False))
    reasons, fixes = [], []
    if recomputed:
        reasons.append(f"{recomputed} are in regions backward recomputes (recompute={ctx.options.recompute!r})")
        fixes.append("recompute='selective' or 'none'")
    if gathered:
        reasons.append(f"{gathered} read weights whose gradients zero={ctx.options.zero} (offload="
                       f"{ctx.options.offload!r}) reduces a layer at a time")
        fixes.append("zero=1 without offload")
    why = "; ".join(reasons) or "none reads a trainable parameter"
    return (f"schedule={ctx.options.schedule!r} runs the weight gradients of matmuls apart from the rest of backward, "
            f"but none of the {len(matmuls)} matmuls here can wait: {why}. Use schedule='1f1b' (the same "
            f"activations) or 'interleaved'{', or ' + ' and '.join(fixes) if fixes else ''}")


def deferrable(node: Node, through_gathers: bool = False) -> tuple[int, ...] | None:
    """The flat positions of ``node``'s weight operands (the contracted weight, and a bias) when
    its weight gradient can wait for W; ``None`` otherwise."""
    if node.op != "call_function" or node.target not in CONTRACTIONS or RECOMPUTE in node.meta:
        return None
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    operands, biases = CONTRACTIONS[node.target]
    flat = pytree.tree_flatten((node.args, node.kwargs))[0]
    if len(flat) <= max(operands) or (node.target is aten.einsum.default and len(flat) != 3):
        return None
    a, b = (flat[i] for i in operands)
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    held_a, held_b = _parameter_view(a, through_gathers), _parameter_view(b, through_gathers)
    if held_a == held_b:  # two activations, or two weights: a product the weights do not enter linearly
        return None
    weight = operands[1] if held_b else operands[0]
    extra = tuple(i for i in biases
                  if i < len(flat) and isinstance(flat[i], Node) and _parameter_view(flat[i], through_gathers))
    for call in (node.meta.get(LOCAL) or {}).values():  # what each rank reads instead (rows shared over tp)
        if call is None:
            continue
        local = pytree.tree_flatten((call.args, call.kwargs))[0]
        if not all(i < len(local) and isinstance(local[i], Node) and _parameter_view(local[i], through_gathers)
                   for i in (weight, *extra)):
            return None
    return (weight, *extra)


def _parameter_view(node: Node, through_gathers: bool) -> bool:
    """Whether ``node`` is a trainable parameter or a view of one (no new memory, no other
    input), or with ``through_gathers`` one's kept whole copy out of ``gather_params``. fxpar's
    own aliasing ops are no views here: their backward is a collective (``sum_duplicates``)."""
    while node.op == "call_function" and getattr(node.target, "is_view", False) and node.target.namespace == "aten":
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    if (through_gathers and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], Node) and node.args[0].target is gather_params):
        node = node.args[0].args[0][node.args[1]]
    return node.op == "get_attr" and bool(node.meta.get(REQUIRES_GRAD))


def defer_weight_grads(graph: Graph) -> Graph:
    """``graph`` (a rank's program) with each op marked ``fxpar_deferred`` called through
    ``later``, where the rank's op still reads its weights as marked (a per-rank call may put a
    collective in between)."""
    for node in graph.nodes:
        weights = node.meta.get(DEFERRED)
        if weights is None or node.op != "call_function" or node.target not in CONTRACTIONS:
            continue
        if deferrable(node, True) != weights:  # the rank's op is not the one marked
            continue
        node.args = (node.target, weights, *node.args)
        node.target = later
    graph.lint()
    return graph
