"""Running the regions ``plan_recompute`` chose under activation checkpointing.

``checkpoint_regions`` cuts each region out of a rank's graph into a ``Recomputed`` module, which
runs it under ``torch.utils.checkpoint`` (non-reentrant): forward keeps only the region's inputs,
backward runs the region again to remake what its ops saved. fxpar's own dropout streams are put
back to where they stood before the forward for the remake (torch's generators are, by
``checkpoint`` itself), so the remade masks equal the first ones.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule
from torch.utils.checkpoint import checkpoint

from ..metadata import RECOMPUTE
from ..ops.context import current


class Recomputed(nn.Module):
    """One region (``name``) of a rank's program, its activations remade in backward."""

    def __init__(self, body: GraphModule, name: str):
        super().__init__()
        self.body, self.region = body, name

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.body(*inputs)
        return checkpoint(self.body, *inputs, use_reentrant=False, context_fn=_streams_put_back)

    def extra_repr(self) -> str:
        return self.region


def _streams_put_back():
    """``checkpoint``'s context_fn: the states of fxpar's dropout streams before the forward,
    set again for the remake and restored after it."""
    rng = current().rng
    gens = [g for g in (rng.replicated, rng.sharded, rng.context, rng.context_sharded) if g is not None]
    before: list = []

    @contextlib.contextmanager
    def forward():
        before[:] = [g.get_state() for g in gens]
        yield

    @contextlib.contextmanager
    def remake():
        after = [g.get_state() for g in gens]
        for g, s in zip(gens, before):
            g.set_state(s)
        try:
            yield
        finally:
            for g, s in zip(gens, after):
                g.set_state(s)

    return forward(), remake()


def checkpoint_regions(graph: Graph) -> dict[str, nn.Module]:
    """Replace every region of ``graph`` (nodes marked ``fxpar_recompute``) by a call of a
    ``Recomputed`` module; returns those modules by the attribute name the calls use."""
    regions: dict[str, list] = {}
    for n in graph.nodes:
        r = n.meta.get(RECOMPUTE)
        if r is not None and n.op in ("call_function", "call_module"):
            regions.setdefault(r, []).append(n)
    out = {}
    for i, (name, nodes) in enumerate(regions.items()):
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        body, env = Graph(), {}
        for a in inputs:
            env[a] = body.placeholder(a.name)
            env[a].meta = dict(a.meta)
        for n in nodes:
            env[n] = body.node_copy(n, lambda x: env[x])
        body.output(tuple(env[o] for o in outputs))
        key = f"recompute_{i}"
        out[key] = Recomputed(GraphModule(nn.Module(), body, class_name="Region"), name)
        with graph.inserting_after(nodes[-1]):
            call = graph.call_module(key, tuple(inputs))
        call.meta = {k: v for k, v in nodes[-1].meta.items() if k in ("nn_module_stack", "stack_trace")}
        call.meta[RECOMPUTE] = name
        last = call
        for j, o in enumerate(outputs):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (call, j))
            last.meta = {k: v for k, v in o.meta.items() if k != RECOMPUTE}
            o.replace_all_uses_with(last, delete_user_cb=lambda u: u not in inside)
        for n in reversed(nodes):
            graph.erase_node(n)
    graph.lint()
    return out
