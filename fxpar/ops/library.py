"""fxpar's ops as ``torch.library`` operators in the namespace ``fxpar``, so that a per-rank graph,
its generated code and a profiler all name them as ``torch.ops.fxpar.all_reduce`` and not as a
Python function of some module.

Each op is defined by its schema and implemented as ``CompositeImplicitAutograd``: the Python
implementation runs above autograd, so its ``torch.autograd.Function`` gives the backward (the
conjugate collective) and under fake tensors it runs on shapes as any other Python code would.
Layouts travel as ``runs`` strings (``runs_arg``) because a schema has no nested lists.
"""

from __future__ import annotations

import functools

import torch

from ..placement import Shard

_LIB = torch.library.Library("fxpar", "DEF")
IMPLEMENTATIONS: dict = {}  # op -> its Python implementation (``for_dynamo``)


def op(schema: str, opaque: bool = False):
    """Define ``fxpar::<name>`` with ``schema`` and implement it with the decorated function;
    returns the op's default overload, which is what graphs call (``torch.ops.fxpar.<name>.default``:
    one object, so passes can compare node targets with ``is``). ``opaque``: ``torch.compile``
    runs the implementation as Python at every call rather than tracing it, for an op whose
    state lives outside the graph (which weights the optimizer changed since the last call)."""

    def define(fn):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeImplicitAutograd")
        overload = getattr(torch.ops.fxpar, name).default
        # FX names a node after its target's __name__: ``all_reduce``, as a node of an ATen op
        # is named ``linear``, not ``all_reduce_default``
        overload.__name__ = name
        IMPLEMENTATIONS[overload] = torch.compiler.disable(fn) if opaque else fn
        return overload

    return define


def runs_arg(layout: Shard) -> str | None:
    """A layout's ``runs`` as an op argument: ``None`` for an even split, else every rank's
    ``start:stop`` intervals, ranks separated by ``|`` (``"0:16,32:48|16:32,48:64"``)."""
    if layout.is_even:
        return None
    return "|".join(",".join(f"{a}:{b}" for a, b in rr) for rr in layout.runs)


@functools.lru_cache(maxsize=4096)
def parse_runs(text: str) -> tuple:
    """The inverse of ``runs_arg``: per rank, its ``(start, stop)`` intervals."""
    ranks = text.split("|")
    return tuple(tuple(tuple(int(v) for v in iv.split(":")) for iv in rr.split(",") if iv) for rr in ranks)


def for_dynamo(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module running ``gm``'s graph (same parameters, shared) with each fxpar op replaced by
    its Python implementation, for ``torch.compile``: Dynamo traces the implementation's
    ``torch.distributed`` calls into functional collectives that inductor schedules, where the
    op itself would reach inductor still holding its process group."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    from .async_collectives import SYNC, wait

    for node in list(graph.nodes):
        # a collective begun and waited for runs whole: Dynamo traces it, inductor places it
        if node.op == "call_function" and node.target is wait:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in SYNC:
            node.target = SYNC[node.target]
    for node in graph.nodes:
        if node.op == "call_function" and node.target in IMPLEMENTATIONS:
            node.target = IMPLEMENTATIONS[node.target]
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(gm, spec):
            setattr(out, spec, getattr(gm, spec))
    return out
