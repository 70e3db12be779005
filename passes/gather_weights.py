"""Pass (rewrite): read every weight ``zero`` splits over dp, ``precision`` casts or ``offload``
keeps on the host, through ``gather_param``.

Reads ``ctx.zero_rows``, ``ctx.cast_weights`` and ``ctx.offloaded`` (``plan_weights``) and the stages of
``ctx.pipeline``. Every use of such a weight gets its own
``torch.ops.fxpar.gather_param(weight, rows, dtype, group='dp')`` node, placed just
before the op that uses it, in that op's module and stage, so that under zero 3 only the weights
of the layer running are whole at a time (``fxpar/ops/params.py`` says what the op does at each
stage, forward and backward). Runs after ``cut_stages``: a weight is gathered in the stage that
uses it and never sent between stages.
"""

from __future__ import annotations

from torch.fx import GraphModule

from torch.fx.node import map_aggregate

from fxpar.metadata import INPUTS, LOCAL, PLACEMENT, RECOMPUTE, REQUIRES_GRAD, STAGE, LocalCall, copy_meta
from fxpar.ops.params import gather_param
from fxpar.plan_context import PlanContext
from fxpar.stages import owner_of


def gather_weights(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    stages = ctx.pipeline.stages if ctx.pipeline is not None else []
    where = {name: s for s in stages for name in s.nodes}
    for node in list(gm.graph.nodes):
        held = ctx.zero_rows.keys() | ctx.cast_weights | ctx.offloaded
        if node.op != "get_attr" or node.target not in held:
            continue
        rows = ctx.zero_rows.get(node.target)
        dtype = node.meta["val"].dtype if node.target in ctx.cast_weights else None
        for user in list(node.users):
            if user.op == "output":
                continue
            with gm.graph.inserting_before(user):
                g = gm.graph.call_function(gather_param, (node, rows, dtype), {"group": "dp"})
            copy_meta(user, g, val=node.meta.get("val"), **{PLACEMENT: node.meta.get(PLACEMENT), REQUIRES_GRAD: True})
            if RECOMPUTE in user.meta:  # gathered again when backward remakes the region
                g.meta[RECOMPUTE] = user.meta[RECOMPUTE]
            stage = where.get(owner_of(user).name)
            if stage is not None:
                g.meta[STAGE] = stage.index
                stage.nodes.append(g.name)
            user.replace_input_with(node, g)
            calls = user.meta.get(LOCAL)
            if calls:  # per-rank calls (localize_shapes) name the weight too
                swap = lambda a: g if a is node else a  # noqa: E731
                user.meta[LOCAL] = {r: None if c is None else LocalCall(c.target, map_aggregate(c.args, swap),
                                                                         map_aggregate(c.kwargs, swap))
                                    for r, c in calls.items()}
            wanted = user.meta.get(INPUTS)
            if wanted and node.name in wanted:
                user.meta[INPUTS] = {g.name if k == node.name else k: v for k, v in wanted.items()}
    gm.recompile()
    return gm
