"""Everything one rank runs for a plan: its parameters, its programs and its schedule runner.

Shared by ``ParallelModule`` (one process, one rank) and ``Plan`` (every rank in one process).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .. import schedule as sched
from ..capture import Captured
from ..codegen import build_module, get_path, has_path, rank_graph, stage_graph
from ..holder import populate as fill
from ..holder import retarget_submodules
from ..mesh import Mesh
from ..metadata import PLACEMENT, REQUIRES_GRAD
from ..ops.library import for_dynamo
from ..ops.params import row_split
from ..placement import REPLICATE
from ..options import compute_dtype
from ..plan_context import PlanContext
from ..memory import expr
from ..shards import local_shape
from . import zero
from ..weight_grads import defer_weight_grads
from .pipeline import PipelineRunner, Value
from .recompute import checkpoint_regions


class RankProgram:
    """Rank ``rank`` of ``mesh`` for a planned graph. Parameters go into ``root`` under their
    original names; ``full`` is the whole model's program when there is one pipeline stage (it
    supports ``loss.backward()`` by the caller); ``runner`` runs this rank's stages under the
    schedule (``train_step``, pipelined inference)."""

    def __init__(self, root: nn.Module, cap: Captured, gm: GraphModule, ctx: PlanContext, mesh: Mesh, rank: int,
                 device, p2p, *, source=None, seed: int = 0, init_fn=None, populate: bool = True, to_global=None,
                 compile_options: dict | None = None, zeros=frozenset()):
        coord = mesh.coordinate(rank)
        self.dp, self.pp, self.ep, self.cp, self.tp = (coord[d] for d in ("dp", "pp", "ep", "cp", "tp"))
        self.captured = cap
        spec = ctx.pipeline
        mine = [s for s in spec.stages if s.rank == self.pp]
        # the graph names the experts of ep rank 0: this rank holds and reads its own
        keep = {ctx.held_target(p, self.ep) for s in mine for p in s.params}
        placements = {ctx.held_target(t, self.ep): p for t, p in ctx.param_placements.items()}
        outer = {t: (p, self.ep) for t, p in ctx.expert_shards.items()}
        self.names = {}
        if populate:  # a later input signature reuses the parameters the first one made
            self.names = fill(root, cap, placements, self.tp, source, device,
                              seed=seed, init_fn=init_fn, keep=keep, unused=self.pp == 0, outer=outer, zeros=zeros)
        else:  # but for buffers of its own that it is the first to read (a key/value cache)
            new = {t for t in keep & zeros if not has_path(root, t)}
            if new:
                fill(root, cap, placements, self.tp, None, device, keep=new, unused=False, zeros=zeros)
        level = ctx.options.zero
        if populate and (ctx.zero_rows or ctx.cast_weights or ctx.offloaded):
            rows = {ctx.held_target(t, self.ep): n for t, n in ctx.zero_rows.items()}
            cast = {ctx.held_target(t, self.ep) for t in ctx.cast_weights}
            host = {ctx.held_target(t, self.ep) for t in ctx.offloaded}
            places = {ctx.held_target(t, self.ep): (ctx.zero_index(t, coord), ctx.zero_world(t), ctx.zero_group(t))
                      for t in ctx.zero_rows}
            zero.hold_weights(root, cap, {t: n for t, n in rows.items() if t in keep}, cast & keep, level, places,
                              compute_dtype(ctx.options.precision), _dtype(ctx.options.reduce_dtype), host & keep)
        self.params = {t: get_path(root, t) for t in keep if isinstance(get_path(root, t), nn.Parameter)}
        bodies = retarget_submodules(cap.gm, device)
        self.full = None
        def build(graph, name):
            regions = checkpoint_regions(graph) if ctx.recomputed else {}
            return build_module(root, graph, cap.gm, name, {**bodies, **regions})

        if mesh.pp == 1:
            self.full = build(_own_experts(rank_graph(gm, self.tp, device), ctx, self.ep), f"Rank{rank}")
        n = len(spec.stages)
        schedule = sched.make(spec.schedule, mesh.pp, spec.microbatches, spec.virtual)
        self.stages = {}
        for s in mine:
            graph = _own_experts(rank_graph(GraphModule(gm, stage_graph(gm, s, n)), self.tp, device), ctx, self.ep)
            if schedule.splits_backward:
                graph = defer_weight_grads(graph)
            self.stages[s.index] = build(graph, f"Stage{s.index}Rank{rank}")
        if level == 3:  # each weight freed after its layer's forward, gathered again for backward
            for m in [self.full, *self.stages.values()]:
                if m is not None:
                    zero.install_hooks(m)
        if compile_options is not None:  # the same parameters, run through torch.compile
            if self.full is not None:
                self.full = torch.compile(for_dynamo(self.full), **compile_options)
            self.stages = {i: torch.compile(for_dynamo(m), **compile_options) for i, m in self.stages.items()}
        schedule = sched.lower(schedule, spec.links())
        sched.check(schedule)
        self.schedule = schedule
        to_global = to_global or (lambda r: r)

        def peer(stage):  # the rank holding ``stage`` for this rank's dp, ep, cp and tp position
            return to_global(mesh.rank_of(dp=self.dp, pp=schedule.stage_rank[stage], ep=self.ep, cp=self.cp, tp=self.tp))

        self.runner = PipelineRunner(
            spec, schedule, self.stages, self.pp, peer, _values(gm, spec), cap.gm._out_spec, device, p2p,
            _tied_shapes(gm, ctx, spec, coord), _input_shapes(gm),
        )
        self.runner.experts = {t for t in self.params if ctx.is_expert(t)}
        self.runner.split = {t for t, p in self.params.items() if zero.is_split(p)}
        self.runner.overlap = ctx.options.overlap


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "fp32" else compute_dtype(name)


def _own_experts(graph, ctx: PlanContext, ep_rank: int):
    """``graph`` reading this ep rank's experts where it reads ep rank 0's."""
    if ctx.expert_slots:
        for node in graph.nodes:
            if node.op == "get_attr":
                node.target = ctx.held_target(node.target, ep_rank)
    return graph


def _values(gm: GraphModule, spec) -> dict[str, Value]:
    by_name = {n.name: n for n in gm.graph.nodes}
    out = {}
    for s in spec.stages:
        for name in s.outputs:
            node = by_name[name]
            val = node.meta["val"]
            grad = bool(node.meta.get(REQUIRES_GRAD)) and (val.is_floating_point() or val.is_complex())
            shape = [expr(d) for d in val.shape]  # symbolic sizes are evaluated at every step
            out[name] = Value(tuple(local_shape(shape, node.meta.get(PLACEMENT) or REPLICATE)), val.dtype, grad)
    return out


def _input_shapes(gm: GraphModule) -> list:
    """The model inputs' shapes as captured (ints and symbols), in placeholder order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            out.append(tuple(expr(d) for d in v.shape) if isinstance(v, torch.Tensor) else None)
    return out


def _tied_shapes(gm: GraphModule, ctx: PlanContext, spec, coord: dict) -> dict:
    """Shape and dtype of this rank's part (at ``coord``) of each weight several stages hold."""
    out = {}
    for name in spec.tied:
        obj = get_path(gm, name)
        shape = local_shape(obj.shape, ctx.param_placements.get(name, REPLICATE))
        if name in ctx.zero_rows:
            start, stop = row_split(ctx.zero_rows[name], ctx.zero_world(name))[ctx.zero_index(name, coord)]
            shape[0] = stop - start
        out[name] = (tuple(shape), obj.dtype)
    return out



