"""Pass (analysis): each rank's arguments for ops whose arguments carry sizes.

Reads ``fxpar_placement`` and ``fxpar_inputs`` and the localizers in ``fxpar.rules``. Writes
``fxpar_local = {rank: LocalCall}`` on nodes whose call differs on some rank: views and expands of
sharded values get local sizes (``view(x, [B, T, 4, 16])`` -> ``view(x, [B, T, 2, 16])`` at
tp=2, whether the model wrote ``-1`` or the literal head count), splits and slices of a sharded dim
get local bounds, means over a sharded dim become local sums over the global count, and
vocab-parallel embeddings look up only their rows. Codegen applies the calls; the global graph
keeps the global arguments so that it still describes the single-device computation.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxpar.errors import PlanError, describe_node
from fxpar.metadata import INPUTS, LOCAL, PLACEMENT
from fxpar.placement import REPLICATE
from fxpar.plan_context import PlanContext
from fxpar.rules import localizer_for


class _LocalContext:
    def inp(self, node: Node, producer: Node):
        return node.meta.get(INPUTS, {}).get(producer.name, REPLICATE)

    def out(self, node: Node):
        return node.meta.get(PLACEMENT)


def localize_shapes(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    lctx = _LocalContext()
    for node in gm.graph.nodes:
        fn = localizer_for(node) if node.op == "call_function" else None
        if fn is None:
            continue
        try:
            calls = {r: fn(node, r, lctx) for r in range(ctx.world)}
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"could not compute per-rank arguments of {describe_node(node)}: {e}") from e
        if any(c is not None for c in calls.values()):
            node.meta[LOCAL] = calls
    return gm
