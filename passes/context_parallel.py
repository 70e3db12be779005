"""Pass (rewrite): context parallelism — the sequence split over the ``cp`` ranks for every layer.

Runs first, when the mesh has ``cp > 1``; returns the graph unchanged otherwise. Reads ``val``
and writes a new graph: the program of one cp rank, in which every activation holds the rank's
``T / cp`` positions. The rest of the pipeline (tensor parallelism over ``tp``, pipeline stages,
memory) plans that graph as it would a model written for the shorter sequence; its cp
collectives are ops with rules of their own (``fxpar/rules/collectives.py``).

How the split is found. User inputs with a sequence (token ids ``(B, T)``, embeddings
``(B, T, C)``) whose dim 1 has the first one's length are split along it; everything else starts replicated. Each op's own sharding
rule, given its inputs' splits, says what its output is and what it needs (the same rules as
tensor parallelism, with every weight whole), so the split follows the data flow:

* token-wise ops (embeddings, norms, linears, pointwise) keep it;
* a replicated value meeting the split (RoPE's cos/sin table, learned position embeddings, a
  causal mask's rows) is sliced to the rank's positions — each rank sees its own offsets;
* ``scaled_dot_product_attention`` on sequence-split q, k, v is Ulysses attention: an all-to-all
  makes them head-split with the whole sequence (so a causal mask is the single-device one),
  and another switches the output back. Where the heads do not divide by cp, or attention is
  written out (``softmax(q @ k.T) @ v``), the keys/values are all-gathered instead;
* a mean over the sequence (the loss) is a partial sum, all-reduced where it is used whole;
* a weight used by split activations gets ``copy_to_tp(w, group="cp")``: its gradient is summed
  over the cp ranks in backward, as each rank only saw its own positions.

The program takes the user's inputs whole and returns outputs whole (logits are all-gathered
over cp), so it is a drop-in for the model. What it guarantees: every change of split is an
explicit collective inserted by ``insert_collectives``; a split that the sizes do not allow
(a symbolic or indivisible sequence length) is an error that says what to change.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from fxpar.codegen import copy_graph, get_path
from fxpar.errors import PlanError, describe_node
from fxpar.metadata import COMM, INPUTS, LOCAL, PLACEMENT, copy_meta
from fxpar.placement import REPLICATE, Placement, Shard
from fxpar.plan_context import PlanContext
from fxpar.rules import FREE, is_weight, rule_for, user_dependent
from fxpar.rules.base import arg, is_tensor_node, ndim, shape, static, tensor_args
from fxpar.runtime.comm import shape_comms
from fxpar.runtime.context import RankContext, running

from .annotate_tensors import annotate_tensors
from .estimate_memory import fake_mode
from .insert_collectives import insert_collectives
from .localize_shapes import localize_shapes

aten = torch.ops.aten


class _Split:
    """The ``RuleContext`` of the cp plan: every weight whole, activations as planned so far."""

    def __init__(self, world: int, user_dep: set[Node]):
        self.world = world
        self.user_dep = user_dep
        self.given: dict[Node, Placement] = {}  # what consumers of a node are given

    def placement(self, node):
        if not isinstance(node, Node):
            return None
        return self.given.get(node, REPLICATE)

    def decision(self, node: Node) -> str:
        return "auto"

    def seed_layout(self, node: Node):
        return None

    def user_input_dependent(self, node: Node) -> bool:
        return node in self.user_dep

    def is_weight(self, node: Node) -> bool:
        return is_weight(node)


def context_parallel(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    if ctx.mesh.cp == 1:
        return gm
    cctx = dataclasses.replace(
        ctx, group="cp", sequence_parallel=False, recompute_gathers=False,
        decisions={}, param_placements={}, sequence_split={}, warnings=[],
    )
    _mean_losses_as_sums(gm)
    annotate_tensors(gm, cctx)
    _plan(gm, cctx)
    insert_collectives(gm, cctx)
    localize_shapes(gm, cctx)
    ctx.warnings.extend(cctx.warnings)
    return _rank_program(gm, cctx)


def _mean_losses_as_sums(gm: GraphModule) -> None:
    """``cross_entropy(x, t)`` (a mean over the targets that are not ``ignore_index``) as
    ``cross_entropy(x, t, reduction="sum") / (t != ignore_index).sum()``: the same value, in
    which each cp rank's tokens give a partial sum and the count is summed over the ranks,
    instead of gathering the logits."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.cross_entropy_loss.default or arg(node, 3, "reduction", 1) != 1:
            continue
        if arg(node, 2, "weight") is not None or ndim(node.args[1]) == ndim(node.args[0]):
            continue  # class weights, or probabilities as targets: a weighted mean, left whole
        x, t = node.args[0], node.args[1]
        ignore = arg(node, 4, "ignore_index", -100)
        smoothing = arg(node, 5, "label_smoothing", 0.0)
        with graph.inserting_after(node):
            total = graph.call_function(aten.cross_entropy_loss.default, (x, t, None, 2, ignore, smoothing))
            with graph.inserting_after(total):
                valid = graph.call_function(aten.ne.Scalar, (t, ignore))
                with graph.inserting_after(valid):
                    count = graph.call_function(aten.sum.default, (valid,))
                    with graph.inserting_after(count):
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


def _has_sequence(node: Node) -> bool:
    """Token ids ``(B, T, ...)`` or embeddings ``(B, T, C, ...)``: a 2-d float input is ``(B, features)``."""
    if node.op != "placeholder" or not is_tensor_node(node):
        return False
    v = node.meta["val"]
    return v.dim() >= (3 if v.is_floating_point() else 2)


def _sequence(gm: GraphModule, world: int) -> int:
    """The sequence length: dim 1 of the first user input that has a sequence."""
    for node in gm.graph.nodes:
        if _has_sequence(node):
            size = static(shape(node)[1])
            if size is None:
                raise PlanError(
                    f"context parallelism splits the sequence (dim 1 of '{node.name}') over cp={world} ranks, "
                    "but it was captured as symbolic: capture with a fixed sequence length"
                )
            if size % world:
                raise PlanError(
                    f"context parallelism splits the sequence (dim 1 of '{node.name}', {size} positions) evenly "
                    f"over cp={world} ranks: use a sequence length divisible by {world} or another cp"
                )
            return size
    raise PlanError(
        "context parallelism splits the sequence (dim 1) of the model's inputs, but no input has one (token ids "
        "(batch, seq) or embeddings (batch, seq, features)): use a mesh without cp for this model"
    )


def _plan(gm: GraphModule, ctx: PlanContext) -> None:
    world = ctx.tp
    seq = _sequence(gm, world)
    rc = _Split(world, user_dependent(gm))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[PLACEMENT] = REPLICATE if is_tensor_node(node) else None
            if _has_sequence(node) and static(shape(node)[1]) == seq:
                rc.given[node] = Shard.even(1, seq, world)  # given whole, sliced on entry
            continue
        if node.op == "get_attr":
            node.meta[PLACEMENT] = REPLICATE if is_tensor_node(node) else None
            continue
        if node.op == "output":
            node.meta[INPUTS] = {n.name: REPLICATE for n in tensor_args(node)}
            continue
        if node.op != "call_function":
            raise PlanError(f"context parallelism cannot split the sequence through {node.op} nodes yet\n  {describe_node(node)}")
        try:
            s = _ulysses(node, rc) or rule_for(node)(node, rc)
        except Exception as e:  # noqa: BLE001 - a rule bug must name the node
            raise PlanError(f"sharding rule failed on {describe_node(node)}\n  {type(e).__name__}: {e}") from e
        reqs = {}
        for inp in tensor_args(node):
            req = s.inputs.get(inp)
            reqs[inp.name] = rc.placement(inp) if req is None or req is FREE else req
            if isinstance(inp.meta.get(PLACEMENT), Shard) and reqs[inp.name] is REPLICATE:
                ctx.warnings.append(
                    f"context parallelism gathers the whole sequence of {inp.name}: "
                    f"{s.fallback or 'the op needs all positions'}\n  {describe_node(node)}"
                )
        node.meta[INPUTS] = reqs
        out = s.output
        node.meta[PLACEMENT] = out
        rc.given[node] = out
        if getattr(s, "back", None) is not None:
            rc.given[node] = s.back


def _ulysses(node: Node, rc: _Split):
    """Attention on sequence-split q, k, v as Ulysses attention: head-split inputs with the whole
    sequence (an all-to-all each), the output switched back to the sequence split."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return None
    q, k, v = node.args[:3]
    nd = ndim(q)
    seq_split = [rc.placement(t) for t in (q, k, v)]
    if not all(isinstance(p, Shard) and p.dim == nd - 2 and p.is_even for p in seq_split):
        return None
    heads = [static(shape(t)[nd - 3]) for t in (q, k, v)]
    if any(h is None or h % rc.world for h in heads):
        return None
    saved = {t: rc.given.get(t) for t in (q, k, v)}
    for t, h in zip((q, k, v), heads):
        rc.given[t] = Shard.even(nd - 3, h, rc.world)
    try:
        s = rule_for(node)(node, rc)
    finally:
        for t, p in saved.items():
            rc.given[t] = p
    if not (isinstance(s.output, Shard) and s.output.dim == nd - 3):
        return None
    s.back = seq_split[0]
    return s


def _rank_program(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    """Rank 0's program, checked to be every cp rank's (ranks differ only in what the collectives
    pick at run time), with the metadata of a fresh capture: values of its own sizes."""
    for node in gm.graph.nodes:
        calls = node.meta.get(LOCAL)
        if calls and any(c != calls[0] for c in calls.values()):
            raise PlanError(f"context parallelism needs the same program on every cp rank, but this op differs\n  {describe_node(node)}")
    graph, val_map = copy_graph(gm.graph)
    for old, new in val_map.items():
        call = (old.meta.get(LOCAL) or {}).get(0)
        if call is not None:
            remap = lambda a: val_map.get(a, a) if isinstance(a, Node) else a  # noqa: E731
            new.target, new.args, new.kwargs = call.target, map_aggregate(call.args, remap), map_aggregate(call.kwargs, remap)
        new.meta = {k: v for k, v in old.meta.items() if not k.startswith("fxpar_") or k == COMM}
    local = GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(local, attr, getattr(gm, attr))
    _propagate(local, gm, ctx)
    return local


def _propagate(local: GraphModule, gm: GraphModule, ctx: PlanContext) -> None:
    """Every node's ``val`` at the rank's sizes, on the capture's fake tensors."""
    env: dict = {}
    with fake_mode(gm), running(RankContext(rank=0, comms=shape_comms(ctx.mesh))):
        for node in local.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "get_attr":
                obj = get_path(local, node.target)
                out = torch.empty(obj.shape, dtype=obj.dtype, device=obj.device) if isinstance(obj, torch.Tensor) else obj
            elif node.op == "placeholder":
                out = node.meta.get("val")
            else:
                args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
                out = node.target(*args, **kwargs)
                node.meta["val"] = out
            env[node] = out
