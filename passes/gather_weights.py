"""Pass (rewrite): read every weight ``zero`` splits over dp, ``precision`` casts or ``offload``
keeps on the host, through ``gather_params``, one call per layer.

Reads ``ctx.zero_rows``, ``ctx.cast_weights`` and ``ctx.offloaded`` (``plan_weights``), the stages
of ``ctx.pipeline`` and ``fxpar_recompute``. The uses of such weights are grouped into buckets:
by the repeated block the op reading them runs in (``fxpar/blocks.py``; outside every block, by
the op's own module), its stage, its recomputed region, the dtype the weights are read in and
the ranks their rows are split over (``ctx.zero_group``).
Each bucket gets one ``torch.ops.fxpar.gather_params(weights, rows, dtype, group='dp')`` node,
placed just before the bucket's first op, in that op's module, stage and region, and every use
reads its weight out of it: under zero 3 a layer's weights are whole together while the layer
runs (FSDP's unit), gathered in one all-gather, and their gradients reduce-scattered in one;
each bucket's gather names the next bucket's weights (``prefetch``), whose gather then begins in
the background while the layer computes, as the backward begins the previous layer's regather
(``fxpar/ops/params.py`` says what happens at each stage, forward and backward). Runs after
``cut_stages``: a weight is gathered in the stage that uses it and never sent between stages.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule
from torch.fx.node import map_aggregate

from fxpar.blocks import innermost, owners, repeated_blocks
from fxpar.metadata import INPUTS, LOCAL, PLACEMENT, RECOMPUTE, REQUIRES_GRAD, STAGE, LocalCall, copy_meta
from fxpar.ops.params import gather_params
from fxpar.plan_context import PlanContext
from fxpar.stages import owner_of


def gather_weights(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    stages = ctx.pipeline.stages if ctx.pipeline is not None else []
    where = {name: s for s in stages for name in s.nodes}
    held = ctx.zero_rows.keys() | ctx.cast_weights | ctx.offloaded
    block_of = owners(gm, repeated_blocks(gm))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    buckets: dict[tuple, list] = {}  # key -> [(user, weight)] in graph order
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in held:
            continue
        for user in node.users:
            if user.op == "output":
                continue
            stage = where.get(owner_of(user).name)
            dtype = node.meta["val"].dtype if node.target in ctx.cast_weights else None
            unit = block_of.get(user) or innermost(user)
            group = ctx.zero_group(node.target)  # an expert's rows over dp, a dense weight's over dp x ep
            key = (stage.index if stage is not None else None, unit, user.meta.get(RECOMPUTE), dtype, group)
            buckets.setdefault(key, []).append((user, node))
    for uses in buckets.values():
        uses.sort(key=lambda uw: order[uw[0]])
    ordered = sorted(buckets.items(), key=lambda kv: order[kv[1][0][0]])
    for k, ((stage_index, _, region, dtype, group), uses) in enumerate(ordered):
        weights = list(dict.fromkeys(w for _, w in uses))
        first = uses[0][0]
        # a region remade in backward would begin the next one's gather again, for nothing
        following = _next_bucket(ordered, k, ctx) if region is None else []
        with gm.graph.inserting_before(first):
            g = gm.graph.call_function(
                gather_params, (weights, [ctx.zero_rows.get(w.target, -1) for w in weights], dtype, following),
                {"group": group})
            items = {}
            for k, w in enumerate(weights):
                items[w] = gm.graph.call_function(operator.getitem, (g, k))
        for w in weights + following:  # a get_attr export placed just before its own op may come later
            if order[w] > order[first]:
                g.prepend(w)
                order[w] = order[first] - 0.5
        copy_meta(first, g, val=[w.meta.get("val") for w in weights],
                  **{PLACEMENT: tuple(w.meta.get(PLACEMENT) for w in weights)})
        for w, item in items.items():
            copy_meta(first, item, val=w.meta.get("val"), **{PLACEMENT: w.meta.get(PLACEMENT), REQUIRES_GRAD: True})
        for n in (g, *items.values()):
            if region is not None:  # gathered again when backward remakes the region
                n.meta[RECOMPUTE] = region
            if stage_index is not None:
                n.meta[STAGE] = stage_index
                stages[stage_index].nodes.append(n.name)
        for user, w in uses:
            _read_through(user, w, items[w])
    gm.graph.lint()
    gm.recompile()
    return gm


def _next_bucket(ordered: list, k: int, ctx: PlanContext) -> list:
    """Under zero 3, the weights split over dp of the bucket after the ``k``-th in the same stage
    (its gather begins as the ``k``-th's ends: FSDP's forward prefetch); else none."""
    if ctx.options.zero != 3:
        return []
    stage, group = ordered[k][0][0], ordered[k][0][4]
    for key, uses in ordered[k + 1:]:
        if key[0] == stage and key[4] == group:
            return [w for w in dict.fromkeys(w for _, w in uses) if w.target in ctx.zero_rows]
    return []


def _read_through(user, weight, item) -> None:
    """``user`` reads ``item`` where it read ``weight``, in its per-rank calls and layout requests too."""
    user.replace_input_with(weight, item)
    calls = user.meta.get(LOCAL)
    if calls:  # per-rank calls (localize_shapes) name the weight too
        swap = lambda a: item if a is weight else a  # noqa: E731
        user.meta[LOCAL] = {r: None if c is None else LocalCall(c.target, map_aggregate(c.args, swap),
                                                                 map_aggregate(c.kwargs, swap))
                            for r, c in calls.items()}
    wanted = user.meta.get(INPUTS)
    if wanted and weight.name in wanted:
        user.meta[INPUTS] = {item.name if k == weight.name else k: v for k, v in wanted.items()}
