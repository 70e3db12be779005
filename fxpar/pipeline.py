"""The compiler: one ordered list of passes, each with the condition under which it runs, and
the runner that applies them. ``passes_run(ctx)`` says which run for a mesh and options (also in
``plan.summary()``).

``FXPAR_DEBUG`` selects what the runner prints (passes never print): ``1`` each pass and its
time, ``2`` also the node count each pass adds or removes, ``3`` also every rank's generated code
(printed by ``compile``), ``4`` also every pass's graph written to ``$FXPAR_DEBUG_DIR``
(default ``./fxpar_debug``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from torch.fx import GraphModule

from fxpar.passes.annotate_tensors import annotate_tensors
from fxpar.passes.assign_rng import assign_rng
from fxpar.passes.collective_matmuls import collective_matmuls
from fxpar.passes.context_parallel import cp_context, cp_rank_program, split_sequence
from fxpar.passes.cut_stages import cut_stages
from fxpar.passes.estimate_memory import estimate_memory
from fxpar.passes.gather_weights import gather_weights
from fxpar.passes.expert_parallel import expert_parallel
from fxpar.passes.insert_collectives import insert_collectives
from fxpar.passes.localize_shapes import localize_shapes
from fxpar.passes.overlap_collectives import overlap_collectives
from fxpar.passes.plan_sharding import plan_sharding
from fxpar.passes.plan_recompute import plan_recompute
from fxpar.passes.plan_weights import plan_weights
from fxpar.passes.recompute_gathers import recompute_gathers
from fxpar.passes.sequence_parallel import sequence_parallel
from fxpar.passes.split_backward import split_backward
from fxpar.passes.split_loss_means import split_loss_means

from .errors import FxparError, PlanError
from .plan_context import PlanContext
from .schedule import make as make_schedule

Pass = Callable[[GraphModule, PlanContext], GraphModule]


def always(ctx: PlanContext) -> bool:
    return True


def cp(ctx: PlanContext) -> bool:
    return ctx.mesh.cp > 1


def ep(ctx: PlanContext) -> bool:
    return ctx.mesh.ep > 1


def sp(ctx: PlanContext) -> bool:
    return ctx.options.sequence_parallel and ctx.world > 1


def held_apart(ctx: PlanContext) -> bool:
    """Whether a rank holds weights other than as the graph reads them (zero, precision)."""
    return ctx.options.zero > 0 or ctx.options.precision != "fp32" or ctx.options.offload is not None


def recomputation(ctx: PlanContext) -> bool:
    return ctx.options.recompute != "none"


def backward_split(ctx: PlanContext) -> bool:
    """Whether the schedule runs backward as B and W (the zero-bubble schedules)."""
    return ctx.mesh.pp > 1 and make_schedule(ctx.options.schedule, ctx.mesh.pp, ctx.options.microbatches,
                                    ctx.options.virtual).splits_backward


def gathers_recomputed(ctx: PlanContext) -> bool:
    return ctx.options.recompute_gathers and ctx.world > 1


def collectives_overlapped(ctx: PlanContext) -> bool:
    """Whether collectives over tp or cp are begun early and waited for late."""
    return ctx.options.overlap and (ctx.world > 1 or ctx.mesh.cp > 1)


def matmuls_overlapped(ctx: PlanContext) -> bool:
    """Whether tp's collectives are fused with their matmuls to overlap them (not under a
    zero-bubble schedule, whose W takes the weight gradients of plain linears)."""
    return ctx.options.overlap and ctx.world > 1 and not backward_split(ctx)


@dataclass(frozen=True)
class Step:
    """One entry of the pipeline: ``run`` (a pass, or ``steps`` run in the context ``context``
    makes from the plan's) when ``when(ctx)`` holds."""

    run: Pass | None
    when: Callable[[PlanContext], bool] = always
    steps: tuple = ()
    context: Callable[[PlanContext], PlanContext] | None = None
    label: str = ""

    @property
    def __name__(self) -> str:  # noqa: A003 - reads as the pass it runs
        return self.label or self.run.__name__


CONTEXT_PARALLEL = (  # the program of one cp rank: the sequence split planned as tp plans a split
    annotate_tensors,  # analysis: which values can carry a gradient
    split_sequence,  # analysis: every value's split over cp, from the inputs' sequence dim
    insert_collectives,  # rewrite: the cp collectives (Ulysses' all-to-alls, sliced tables, gathers)
    localize_shapes,  # analysis: one cp rank's sizes
    cp_rank_program,  # rewrite: the graph of one cp rank, that the tp passes below plan
)

PIPELINE: list[Step] = [
    Step(split_loss_means, cp),  # rewrite: mean cross-entropies as sums over counts (partial sums over cp)
    Step(None, cp, CONTEXT_PARALLEL, cp_context, "context_parallel"),  # the steps above, over cp
    Step(expert_parallel, ep),  # rewrite: experts split over the ep ranks, tokens sent to them by all-to-all
    Step(annotate_tensors),  # analysis: which values can carry a gradient
    Step(plan_sharding),  # analysis: every value's placement; column/row/vocab decisions from the data flow
    Step(sequence_parallel, sp),  # analysis: the activations between TP blocks split by sequence
    Step(insert_collectives),  # rewrite: explicit collectives wherever a placement changes, f/g conjugates
    Step(recompute_gathers, gathers_recomputed),  # rewrite: column-parallel inputs kept as shards for backward
    Step(collective_matmuls, matmuls_overlapped),  # rewrite: sp's gathers and reduce-scatters fused with their linears
    Step(assign_rng),  # rewrite: dropout draws from a replicated or a per-rank random stream
    Step(localize_shapes),  # analysis: per-rank sizes for views, splits, slices, means and embeddings
    Step(plan_weights, held_apart),  # analysis: weights split into rows over dp (zero), fp32 masters (precision)
    Step(estimate_memory),  # analysis: parameter and saved-activation bytes per node, on fake tensors
    Step(cut_stages),  # analysis: pipeline stages that minimize the largest per-device peak memory
    Step(plan_recompute, recomputation),  # analysis: regions backward recomputes (attention cores, layers, auto)
    Step(gather_weights, held_apart),  # rewrite: each such weight made whole, cast, just before the op reading it
    Step(split_backward, backward_split),  # analysis: matmuls whose weight gradients wait for W (zero bubble)
    Step(overlap_collectives, collectives_overlapped),  # rewrite: collectives begun early, waited for late
]


def debug_level() -> int:
    try:
        return int(os.environ.get("FXPAR_DEBUG", "0"))
    except ValueError:
        return 0


def passes_run(ctx: PlanContext, steps=None) -> list[str]:
    """The passes the pipeline runs for ``ctx``'s mesh and options, in order (the
    context-parallel steps as ``context_parallel.<pass>``)."""
    out = []
    for step in PIPELINE if steps is None else steps:
        if not step.when(ctx):
            continue
        out += [f"{step.__name__}.{p.__name__}" for p in step.steps] if step.steps else [step.__name__]
    return out


def run_pipeline(gm: GraphModule, ctx: PlanContext, passes=None) -> GraphModule:
    """Apply ``passes`` (default ``PIPELINE``: steps, or bare passes) in order, each step only
    where its condition holds; a failure names the pass and those before it."""
    passes = PIPELINE if passes is None else passes
    level = debug_level()
    ctx.passes = passes_run(ctx, [p if isinstance(p, Step) else Step(p) for p in passes])
    done: list[str] = []
    for i, step in enumerate(passes):
        step = step if isinstance(step, Step) else Step(step)
        where = f"{i + 1}/{len(passes)} {step.__name__}"
        if not step.when(ctx):
            if level >= 1:
                print(f"[fxpar] pass {where}: skipped ({step.when.__name__} is off)", file=sys.stderr)
            _write_debug(level, i, step.__name__, f"skipped: {step.when.__name__} is off for {ctx.mesh}")
            continue
        if step.steps:
            sub = step.context(ctx)
            for p in step.steps:
                gm = _apply(p, gm, sub, f"{where}.{p.__name__}", done, level)
            ctx.warnings.extend(sub.warnings)
        else:
            gm = _apply(step.run, gm, ctx, where, done, level)
        _write_debug(level, i, step.__name__, gm)
    return gm


def _apply(p: Pass, gm: GraphModule, ctx: PlanContext, where: str, done: list, level: int) -> GraphModule:
    name = getattr(p, "__name__", repr(p))
    before = len(gm.graph.nodes)
    t0 = time.perf_counter()
    try:
        gm = p(gm, ctx)
    except FxparError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the pass that failed
        raise PlanError(
            f"pass {name} failed (after {', '.join(done) or 'no passes'}): {type(e).__name__}: {e}"
        ) from e
    done.append(name)
    if level >= 1:
        line = f"[fxpar] pass {where}: {1000 * (time.perf_counter() - t0):.1f} ms"
        if level >= 2:
            line += f", nodes {before} -> {len(gm.graph.nodes)} ({len(gm.graph.nodes) - before:+d})"
        print(line, file=sys.stderr)
    return gm


def _write_debug(level: int, i: int, name: str, what) -> None:
    if level < 4:
        return
    folder = os.environ.get("FXPAR_DEBUG_DIR", "fxpar_debug")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{i + 1:02d}_{name}.txt"), "w") as f:
        f.write(what if isinstance(what, str) else what.print_readable(print_output=False))
