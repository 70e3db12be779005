"""Pass (rewrite): context parallelism — the sequence split over the ``cp`` ranks for every layer.

Runs first, when the mesh has ``cp > 1``, as the steps ``fxpar/pipeline.py`` lists under
``context_parallel``: in ``cp_context``, ``annotate_tensors``, ``split_sequence`` (here),
``insert_collectives`` and ``localize_shapes`` plan the split over cp as tensor parallelism plans
one over tp, and ``cp_rank_program`` (here) writes a new graph: the program of one cp rank, in
which every activation holds the rank's ``T / cp`` positions. The rest of the pipeline (tensor
parallelism over ``tp``, pipeline stages, memory) plans that graph as it would a model written
for the shorter sequence; its cp collectives are ops with rules of their own
(``fxpar/rules/collectives.py``).

How the split is found. User inputs with a sequence (token ids ``(B, T)``, embeddings
``(B, T, C)``) whose dim 1 has the first one's length are split along it; everything else
starts replicated. Each op's own sharding rule, given its inputs' splits, says what its output
is and what it needs (the same rules as tensor parallelism, with every weight whole), so the
split follows the data flow:

* token-wise ops (embeddings, norms, linears, pointwise) keep it;
* a replicated value meeting the split (RoPE's cos/sin table, learned position embeddings, a
  causal mask's rows) is sliced to the rank's positions — each rank sees its own offsets;
* ``scaled_dot_product_attention`` on sequence-split q, k, v is Ulysses attention: an all-to-all
  makes them head-split with the whole sequence (so a causal mask is the single-device one),
  and another switches the output back. Where the heads do not divide by cp, q, k and v are
  gathered and every rank attends with all of them; attention written out
  (``softmax(q @ k.T) @ v``) keeps each rank's queries and gathers the keys and values;
* a sum over the sequence (the loss, as ``passes/split_loss_means.py`` writes a mean) is a
  partial sum, all-reduced where it is used whole;
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

from fxpar.codegen import rank_graph
from fxpar.errors import PlanError, describe_node
from fxpar.fake_values import propagate
from fxpar.metadata import COMM, INPUTS, LOCAL, PLACEMENT, RNG
from fxpar.placement import REPLICATE, Shard
from fxpar.plan_context import PlanContext
from fxpar.rules import FREE, SplitRuleContext, rule_for, user_dependent
from fxpar.rules.base import is_tensor_node, ndim, shape, static, tensor_args


aten = torch.ops.aten


class _Split(SplitRuleContext):
    """The ``RuleContext`` of the cp plan: every weight whole, activations as planned so far."""

    def placement(self, node):
        if not isinstance(node, Node):
            return None
        return self.given.get(node, REPLICATE)


def cp_context(ctx: PlanContext) -> PlanContext:
    """The context the context-parallel steps plan in: placements over ``cp``, every weight whole,
    none of tensor parallelism's options, results of its own (its warnings reach the user)."""
    return dataclasses.replace(
        ctx,
        group="cp",
        options=ctx.options.replace(sequence_parallel=False, recompute_gathers=False),
        decisions={},
        param_placements={},
        sequence_split={},
        warnings=[],
    )


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
                    f"context parallelism splits the sequence (dim 1 of input '{node.name}', shape "
                    f"{tuple(shape(node))}) over cp={world} ranks, but it was captured as symbolic: capture with a "
                    "fixed sequence length (dynamic_shapes for the batch only)"
                )
            if size % world:
                raise PlanError(
                    f"context parallelism splits the sequence (dim 1 of input '{node.name}', shape "
                    f"{tuple(shape(node))}) evenly over cp={world} ranks: use a sequence length divisible by {world} "
                    "or another cp"
                )
            return size
    raise PlanError(
        "context parallelism splits the sequence (dim 1) of the model's inputs, but no input has one (token ids "
        "(batch, seq) or embeddings (batch, seq, features)): use a mesh without cp for this model"
    )


def split_sequence(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    """Analysis: every value's split over the cp ranks, from the inputs' sequence dim through
    each op's rule (writes ``fxpar_placement`` and ``fxpar_inputs`` as ``plan_sharding`` does)."""
    world = ctx.world
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
            raise PlanError(
                f"context parallelism cannot split the sequence through {node.op} nodes (higher-order ops) yet: "
                f"use a mesh without cp for this model\n  {describe_node(node)}"
            )
        try:
            s, back = _ulysses(node, rc) or (rule_for(node)(node, rc), None)
        except Exception as e:  # noqa: BLE001 - a rule bug must name the node
            raise PlanError(
                f"context parallelism: sharding rule failed on {describe_node(node)}\n  {type(e).__name__}: {e}"
            ) from e
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
        rc.given[node] = out if back is None else back
    return gm


def _ulysses(node: Node, rc: _Split):
    """``(sharding, given)`` of attention on sequence-split q, k, v as Ulysses attention:
    head-split inputs with the whole sequence (an all-to-all each), and the output given to its
    readers switched back to the sequence split; None where the heads do not divide."""
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
    return s, seq_split[0]


def cp_rank_program(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    """Rewrite: rank 0's program (a new ``GraphModule``), checked to be every cp rank's (ranks
    differ only in what the collectives pick at run time), with the metadata of a fresh capture:
    values of its own sizes."""
    for node in gm.graph.nodes:
        calls = node.meta.get(LOCAL)
        if calls and any(c != calls[0] for c in calls.values()):
            raise PlanError(
                "context parallelism needs the same program on every cp rank, but this op's sizes differ between them "
                f"(an uneven split): use a cp that divides the sequence and the heads\n  {describe_node(node)}"
            )
    graph = rank_graph(gm, 0, torch.device("meta"))  # captured on meta: devices stay as they are
    planned = {n.name: n for n in gm.graph.nodes}
    for new in graph.nodes:
        old = planned[new.name]
        new.meta = {k: v for k, v in old.meta.items() if not k.startswith("fxpar_") or k == COMM}
        if old.target is aten.dropout.default and isinstance(old.meta.get(PLACEMENT), Shard):
            new.meta[RNG] = "context"  # its own masks on every cp rank (passes/assign_rng.py)
    local = GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(local, attr, getattr(gm, attr))
    propagate(local, gm, ctx.mesh)
    return local
