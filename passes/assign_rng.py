"""Pass (rewrite): give every dropout the random stream its placement needs.

Reads ``fxpar_placement`` of each ``aten.dropout`` node and ``ctx.options.rng``. Replaces the node's
target with ``fxpar.ops.local.dropout`` and writes ``fxpar_rng``:

* replicated value -> ``"replicated"``: every tp rank draws the same mask from the same stream;
* sharded value -> ``"sharded"``: each rank draws its own slice from its own stream (Megatron's
  model-parallel RNG tracker), or, with ``ctx.options.rng == "exact"``, the full mask from the replicated
  stream and keeps its slice, which reproduces the single-device masks.

A dropout whose input ``passes/context_parallel.py`` split over cp (``fxpar_rng == "context"``
on entry) draws from the rank's cp streams instead, one per cp rank, and gets `` (cp split)``
appended; values every cp rank holds whole draw the same masks on all of them.

Attention with built-in dropout (``scaled_dot_product_attention(dropout_p > 0)``) on sharded heads
draws inside the kernel, per rank; with ``rng="exact"`` that is reported as a warning, since those
masks cannot equal the single-device ones.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxpar.errors import PlanError, describe_node
from fxpar.metadata import PLACEMENT, RNG
from fxpar.placement import Shard
from fxpar.plan_context import PlanContext
from fxpar.rules.base import arg
from fxpar.ops.library import runs_arg
from fxpar.ops.local import dropout

aten = torch.ops.aten


def assign_rng(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        p = node.meta.get(PLACEMENT)
        if node.target == aten.dropout.default:
            x, prob, train = node.args
            if prob == 0.0 or train is False:  # draws nothing: no op to run or to read in the code
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                continue
            # split over cp by passes/context_parallel.py: each cp rank draws its own masks
            context = node.meta.get(RNG) == "context"
            if context and ctx.options.rng == "exact" and prob and train:
                raise PlanError(
                    "rng='exact' draws the single-device dropout masks, but this dropout's input is split over "
                    "the cp ranks, which draw their own: use rng='megatron' (the default) or a mesh without cp"
                    f"\n  {describe_node(node)}"
                )
            if isinstance(p, Shard):
                node.meta[RNG] = "sharded"
                node.args = (x, prob, train, "sharded", p.dim, p.size, runs_arg(p))
            else:
                node.meta[RNG] = "replicated"
                node.args = (x, prob, train)
            node.kwargs = {"context": True} if context else {}
            node.meta[RNG] += " (cp split)" if context else ""
            node.target = dropout
        elif node.target == aten.scaled_dot_product_attention.default:
            p_drop = arg(node, 4, "dropout_p", 0.0)
            if ctx.options.rng == "exact" and isinstance(p, Shard) and p_drop:
                ctx.warnings.append(
                    "attention dropout inside scaled_dot_product_attention on sharded heads draws "
                    f"per-rank masks that cannot equal the single-device ones\n  {describe_node(node)}"
                )
    gm.graph.lint()
    gm.recompile()
    return gm
