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
* ``scaled_dot_product_attention`` on sequence-split q, k, v is Ulysses attention
  (``context_parallel="ulysses"``): an all-to-all makes them head-split with the whole sequence
  (so a causal mask is the single-device one), and another switches the output back; or ring
  attention (``"ring"``, ``fxpar/ops/ring.py``): each rank keeps its positions and the key/value
  blocks go around the cp ranks, so no rank holds the whole sequence and any number of heads
  works. ``"auto"`` (the default) takes Ulysses where every attention's heads divide by cp x tp,
  ring otherwise. With ring attention and a causal mask the sequence is split zigzag: rank r holds
  chunks r and 2cp-1-r of 2cp, so every rank does the same share of the causal work (the
  layout is a ``Shard`` with those runs, and every op, table slice and gather follows it).
  Attention written out (``softmax(q @ k.T) @ v``) keeps each rank's queries and gathers the
  keys and values;
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
from fxpar.metadata import COMM, INPUTS, LOCAL, PLACEMENT, REQUIRES_GRAD, RING, RNG, CommInfo
from fxpar.ops.ring import ring_attention
from fxpar.placement import REPLICATE, Shard
from fxpar.plan_context import PlanContext
from fxpar.rules import FREE, SplitRuleContext, rule_for, user_dependent
from fxpar.rules.base import Sharding, arg, is_tensor_node, ndim, shape, static, tensor_args


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


def attention_mode(gm: GraphModule, ctx: PlanContext) -> str:
    """``"ring"`` or ``"ulysses"``: the option, or for ``"auto"`` Ulysses when every attention's
    query and key/value heads divide by cp x tp, ring otherwise."""
    mode = ctx.options.context_parallel
    if mode != "auto":
        return mode
    ways = ctx.world * ctx.mesh.tp
    for node in gm.graph.nodes:
        if node.target is aten.scaled_dot_product_attention.default:
            q, k = node.args[:2]
            heads = [static(shape(t)[ndim(t) - 3]) if ndim(t) >= 3 else None for t in (q, k)]
            if any(h is None or h % ways for h in heads):
                return "ring"
    return "ulysses"


def zigzag(dim: int, size: int, world: int) -> Shard:
    """Rank r holds chunks r and 2w-1-r of 2w: under a causal mask each rank's queries see the
    same number of keys."""
    c = size // (2 * world)
    return Shard(dim, size, tuple(((r * c, (r + 1) * c), ((2 * world - 1 - r) * c, (2 * world - r) * c))
                                  for r in range(world)))


def _causal_attention(gm: GraphModule) -> bool:
    return any(n.target is aten.scaled_dot_product_attention.default and arg(n, 5, "is_causal", False)
               for n in gm.graph.nodes)


def split_sequence(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    """Analysis: every value's split over the cp ranks, from the inputs' sequence dim through
    each op's rule (writes ``fxpar_placement`` and ``fxpar_inputs`` as ``plan_sharding`` does,
    and ``fxpar_ring`` on attention that runs as ring attention)."""
    world = ctx.world
    seq = _sequence(gm, world)
    rc = _Split(world, user_dependent(gm))
    ring = attention_mode(gm, ctx) == "ring"
    balanced = ring and _causal_attention(gm) and seq % (2 * world) == 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[PLACEMENT] = REPLICATE if is_tensor_node(node) else None
            if _has_sequence(node) and static(shape(node)[1]) == seq:  # given whole, sliced on entry
                rc.given[node] = zigzag(1, seq, world) if balanced else Shard.even(1, seq, world)
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
        node.meta.pop(RING, None)
        try:
            s, back = (_ring(node, rc) if ring else _ulysses(node, rc)) or (rule_for(node)(node, rc), None)
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


def _ring(node: Node, rc: _Split):
    """``(sharding, None)`` of attention on q, k, v split alike along their positions, as ring
    attention: each keeps its split, the output has the queries'; a mask is read whole. None
    with dropout, where the splits differ, or with a mask that is broadcast along the positions
    or learned (its gradient is not computed)."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return None
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    nd = ndim(q)
    splits = [rc.placement(t) for t in (q, k, v)]
    if not all(isinstance(p, Shard) and p.dim == nd - 2 for p in splits) or len({p.runs for p in splits}) != 1:
        return None
    if arg(node, 4, "dropout_p", 0.0):
        return None
    if isinstance(mask, Node):  # read whole, rows and columns picked per block: a full (.., Tq, Tk) mask, no gradient
        rows_cols = [static(d) for d in shape(mask)[-2:]] if ndim(mask) >= 2 else []
        if rows_cols != [splits[0].size, splits[1].size] or mask.meta.get(REQUIRES_GRAD):
            return None
    inputs = {q: splits[0], k: splits[1], v: splits[2]}
    if isinstance(mask, Node):
        inputs[mask] = REPLICATE
    node.meta[RING] = runs_text(splits[0])
    return Sharding(splits[0], inputs), None


def runs_text(layout: Shard) -> str:
    """Every rank's positions, as ``fxpar.ops.library.runs_arg`` writes an uneven layout."""
    return "|".join(",".join(f"{a}:{b}" for a, b in rr) for rr in layout.runs)


def _as_ring(new: Node, old: Node, world: int) -> None:
    """Make ``new`` (a copy of the attention ``old``) call ring attention over cp."""
    q, k, v = new.args[:3]
    mask = arg(new, 3, "attn_mask")
    new.target = ring_attention
    new.args = (q, k, v, bool(arg(new, 5, "is_causal", False)), arg(new, 6, "scale"), old.meta[RING],
                mask if isinstance(mask, Node) else None)
    new.kwargs = {"group": "cp"}
    new.meta[COMM] = _ring_traffic(old, world)


def _ring_traffic(node: Node, world: int) -> CommInfo:
    """What one cp rank sends for ring attention ``node``: its keys and values (with their own
    heads, grouped-query ones not repeated) to the next rank at each of w-1 steps; in backward
    those again with their fp32 gradients, which make one more step home."""
    k, v = (t.meta["val"] for t in node.args[1:3])
    kv = k.numel() + v.numel()
    local = kv // world
    fwd = (world - 1) * local * k.element_size()
    bwd = (world - 1) * local * (k.element_size() + 4) + local * 4
    return CommInfo("ring", "cp", kv, fwd, bwd, "S(seq)", "S(seq)")


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
        if RING in old.meta:
            _as_ring(new, old, ctx.world)
        if old.target is aten.dropout.default and isinstance(old.meta.get(PLACEMENT), Shard):
            new.meta[RNG] = "context"  # its own masks on every cp rank (passes/assign_rng.py)
    local = GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(local, attr, getattr(gm, attr))
    propagate(local, gm, ctx.mesh)
    return local
