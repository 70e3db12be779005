"""The planner's entry point: the pass pipeline over a captured graph for a mesh and options,
and the example microbatch a plan is made for. Both front ends call it (``compile`` for a
``Plan``, ``ParallelModule`` when it first sees its inputs), so neither imports the other.
"""

from __future__ import annotations

import difflib
import fnmatch

from torch.fx import GraphModule
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from .capture import Captured
from .codegen import copy_graph
from .errors import OptionError, module_path
from .mesh import Mesh
from .options import PlanOptions
from .pipeline import run_pipeline
from .plan_context import PlanContext
from .runtime.pipeline import split_microbatches


def plan_graph(cap: Captured, mesh: Mesh, options: PlanOptions | None = None,
               **changes) -> tuple[GraphModule, PlanContext]:
    """Run the pass pipeline on a copy of the captured graph, with ``options`` (or options given
    by keyword, as ``compile`` takes them; both: ``options`` with those ``changes``)."""
    if options is None:
        options = PlanOptions.from_user("plan_graph()", **changes)
    elif changes:
        options = options.replace(**changes)
    check_overrides(cap, options.overrides)
    ctx = PlanContext(mesh=mesh, options=options, dim_names=dict(cap.dim_names))
    # the passes edit the graph and recompile after; the code is made once, when first read
    gm = _LazyGraphModule(cap.gm, copy_graph(cap.gm.graph)[0], class_name="GlobalPlan")
    gm = run_pipeline(gm, ctx)
    return gm, ctx


def check_overrides(cap: Captured, overrides: dict) -> None:
    """Every pattern of ``overrides`` names some module or parameter of the model: a misspelled
    one would otherwise change nothing, silently."""
    if not overrides:
        return
    names = set(cap.aliases) | set(cap.tensors)
    names |= {name.rsplit(".", i)[0] for name in list(names) for i in range(1, name.count(".") + 1)}
    names |= {module_path(n) for n in cap.gm.graph.nodes if n.op == "call_function"}
    names.discard("")
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".") for n in names):
            close = difflib.get_close_matches(pattern, sorted(names), n=4, cutoff=0.5)
            raise OptionError(
                f"override {pattern!r} matches no module or parameter of the model"
                + (f"; the closest names are {', '.join(repr(c) for c in close)}" if close else "")
                + " (patterns are names or globs over them, e.g. 'lm_head' or 'transformer.h.*.attn.c_attn')"
            )


def first_microbatch(args, kwargs, microbatches: int, replicas: int = 1):
    """The first microbatch of the first replica's part of the inputs: every tensor cut along
    dim 0 into ``replicas`` parts, the first of them into ``microbatches`` pieces."""
    if microbatches * replicas == 1:
        return args, kwargs
    flat, spec = pytree.tree_flatten((args, dict(kwargs or {})))
    if replicas > 1:
        flat = split_microbatches(flat, replicas, "data-parallel replicas (dp x ep)")[0]
    return pytree.tree_unflatten(split_microbatches(flat, microbatches)[0], spec)
