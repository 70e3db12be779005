"""Pass (analysis): which weights ``zero=1|2|3`` splits into rows over the data-parallel ranks.

Reads ``ctx.options.zero``, ``ctx.param_placements`` and the graph's weights. Writes
``ctx.zero_rows``: for every trainable weight split over dp, its dim-0 size on one tp rank (the
rows ``fxpar.ops.params.row_split`` shares out). A weight with fewer rows than dp ranks, or
none (a scalar), stays whole on every dp rank and is averaged by all-reduce as without zero: a
few elements, which splitting would leave some ranks without.

The memory model (``cut_stages``) counts the split weights' bytes by ``zero`` from it, and
``insert_gathers`` makes each whole where a layer reads it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxpar.codegen import get_path
from fxpar.placement import REPLICATE
from fxpar.plan_context import PlanContext
from fxpar.shards import local_shape


def shard_weights(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    dp = ctx.mesh.dp
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in ctx.zero_rows:
            continue
        w = get_path(gm, node.target)
        if not (isinstance(w, torch.nn.Parameter) and w.requires_grad and w.dim() >= 1):
            continue
        rows = local_shape(w.shape, ctx.param_placements.get(node.target, REPLICATE))[0]
        if rows >= dp:
            ctx.zero_rows[node.target] = rows
    return gm
