"""The compiler: one ordered list of passes, and the runner that applies them.

``FXPAR_DEBUG`` selects what the runner prints (passes never print): ``1`` each pass and its
time, ``2`` also the node count each pass adds or removes, ``3`` also every rank's generated code
(printed by ``compile``), ``4`` also every pass's graph written to ``$FXPAR_DEBUG_DIR``
(default ``./fxpar_debug``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from torch.fx import GraphModule

from fxpar.passes.annotate_tensors import annotate_tensors
from fxpar.passes.assign_rng import assign_rng
from fxpar.passes.context_parallel import context_parallel
from fxpar.passes.cut_stages import cut_stages
from fxpar.passes.estimate_memory import estimate_memory
from fxpar.passes.expert_parallel import expert_parallel
from fxpar.passes.insert_collectives import insert_collectives
from fxpar.passes.localize_shapes import localize_shapes
from fxpar.passes.plan_sharding import plan_sharding
from fxpar.passes.recompute_gathers import recompute_gathers
from fxpar.passes.sequence_parallel import sequence_parallel
from fxpar.passes.split_loss_means import split_loss_means

from .errors import FxparError, PlanError
from .plan_context import PlanContext

PIPELINE: list[Callable[[GraphModule, PlanContext], GraphModule]] = [
    split_loss_means,  # rewrite: with cp > 1, mean cross-entropies as sums over counts (partial sums over cp)
    context_parallel,  # rewrite: with cp > 1, one cp rank's program: the sequence split, Ulysses attention
    expert_parallel,  # rewrite: with ep > 1, experts split over the ep ranks, tokens sent to them by all-to-all
    annotate_tensors,  # analysis: which values can carry a gradient
    plan_sharding,  # analysis: every value's placement; column/row/vocab decisions from the data flow
    sequence_parallel,  # analysis: with sequence_parallel, the activations between TP blocks split by sequence
    insert_collectives,  # rewrite: explicit collectives wherever a placement changes, f/g conjugates
    recompute_gathers,  # rewrite: with recompute_gathers, column-parallel inputs kept as shards for backward
    assign_rng,  # rewrite: dropout draws from a replicated or a per-rank random stream
    localize_shapes,  # analysis: per-rank sizes for views, splits, slices, means and embeddings
    estimate_memory,  # analysis: parameter and saved-activation bytes per node, on fake tensors
    cut_stages,  # analysis: pipeline stages that minimize the largest per-device peak memory
]


def debug_level() -> int:
    try:
        return int(os.environ.get("FXPAR_DEBUG", "0"))
    except ValueError:
        return 0


def run_pipeline(gm: GraphModule, ctx: PlanContext, passes=None) -> GraphModule:
    """Apply ``passes`` (default ``PIPELINE``) in order; a failure names the pass and those before it."""
    passes = PIPELINE if passes is None else passes
    level = debug_level()
    done: list[str] = []
    for i, p in enumerate(passes):
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
            line = f"[fxpar] pass {i + 1}/{len(passes)} {name}: {1000 * (time.perf_counter() - t0):.1f} ms"
            if level >= 2:
                line += f", nodes {before} -> {len(gm.graph.nodes)} ({len(gm.graph.nodes) - before:+d})"
            print(line, file=sys.stderr)
        if level >= 4:
            folder = os.environ.get("FXPAR_DEBUG_DIR", "fxpar_debug")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{i + 1:02d}_{name}.txt"), "w") as f:
                f.write(gm.print_readable(print_output=False))
    return gm
