"""Pass (analysis): how each rank holds the weights under ``zero`` and ``precision``.

Reads ``ctx.options.zero`` and ``precision``, ``ctx.param_placements`` and the graph's weights.
Writes:

* ``ctx.zero_rows``: under zero 1, 2, 3, for every trainable weight split over its data-parallel
  replicas (``ctx.zero_group``: dp, and dp x ep for a dense weight under expert parallelism), its
  dim-0 size on one tp rank (the rows ``fxpar.ops.params.row_split`` shares out). A weight with
  fewer rows than replicas, or none (a scalar), stays whole on every one and is averaged by
  all-reduce as without zero: a few elements, which splitting would leave some ranks without.
* ``ctx.cast_weights``: under a compute precision, the floating weights the graph reads in it
  (the capture cast them) while the rank holds them as fp32 masters.
* ``ctx.offloaded``: under ``offload="optimizer"``, the floating weights with a master (trainable
  or cast), whose masters (their rows, with zero), gradients and optimizer state live on the host;
  the device holds the weight as the layers read it.

The memory model (``cut_stages``) counts the weights' bytes from these, and ``gather_weights``
makes each whole, in the compute dtype, where a layer reads it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxpar.codegen import get_path
from fxpar.options import compute_dtype
from fxpar.placement import REPLICATE
from fxpar.plan_context import PlanContext
from fxpar.shards import local_shape


def plan_weights(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    dtype = compute_dtype(ctx.options.precision)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        w = get_path(gm, node.target)
        if not isinstance(w, torch.nn.Parameter):
            continue
        if dtype is not None and w.dtype == dtype:
            ctx.cast_weights.add(node.target)
        if ctx.options.offload and w.is_floating_point() and (w.requires_grad or node.target in ctx.cast_weights):
            ctx.offloaded.add(node.target)
        if not (ctx.options.zero and w.requires_grad and w.dim() >= 1):
            continue
        rows = local_shape(w.shape, ctx.param_placements.get(node.target, REPLICATE))[0]
        if rows >= ctx.zero_world(node.target):
            ctx.zero_rows[node.target] = rows
    return gm
