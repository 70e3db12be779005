"""Emit one rank's program: a ``GraphModule`` that holds only that rank's shards.

The per-rank graph is a copy of the planned global graph in which every node carrying
``fxpar_local`` takes that rank's call and every ``device`` argument (captured on the meta device)
points at the rank's device. Parameters keep their original names: the module's ``state_dict``
keys are a subset of the original model's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule
from torch.fx.node import map_aggregate

from .errors import FxparError
from .metadata import LOCAL, LocalCall


def get_path(obj, target: str):
    """``obj.a.b.c`` for ``target="a.b.c"``."""
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def copy_graph(src: Graph) -> tuple[Graph, dict]:
    """A copy of ``src`` (same node names, shallow-copied meta, same input/output codegen) and the
    map from its nodes to the copies."""
    graph = Graph()
    graph._codegen = src._codegen
    val_map: dict = {}
    graph.output(graph.graph_copy(src, val_map))
    return graph, val_map


def rank_graph(gm: GraphModule, rank: int, device: torch.device) -> Graph:
    """The graph rank ``rank`` runs, with its local calls and its device."""
    graph, val_map = copy_graph(gm.graph)
    retarget = lambda a: device if isinstance(a, torch.device) else a  # noqa: E731
    for old, new in val_map.items():
        call = old.meta.get(LOCAL, {}).get(rank)
        if call is not None:
            new.target = call.target
            new.args = map_aggregate(call.args, lambda a: val_map.get(a, a) if isinstance(a, torch.fx.Node) else a)
            new.kwargs = map_aggregate(call.kwargs, lambda a: val_map.get(a, a) if isinstance(a, torch.fx.Node) else a)
        if new.op == "call_function":
            new.args = map_aggregate(new.args, retarget)
            new.kwargs = map_aggregate(new.kwargs, retarget)
    graph.lint()
    return graph


def build_module(root: nn.Module, graph: Graph, template: GraphModule, name: str, extra=None) -> GraphModule:
    """A ``GraphModule`` running ``graph`` whose attributes come from ``root`` (shared, not copied),
    then from ``extra`` (e.g. retargeted bodies of higher-order ops), and whose input/output tree
    specs come from the captured ``template``."""
    extra = extra or {}
    attrs = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            if has_path(root, node.target):
                attrs[node.target] = get_path(root, node.target)
            elif node.target in extra:
                attrs[node.target] = extra[node.target]
            elif isinstance(get_path(template, node.target), nn.Module):
                attrs[node.target] = get_path(template, node.target)
            else:
                raise FxparError(f"rank program {name} reads '{node.target}', which this rank does not hold")
    gm = GraphModule(attrs, graph, class_name=name)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(template, spec):
            setattr(gm, spec, getattr(template, spec))
    gm.recompile()
    return gm


def has_path(obj, target: str) -> bool:
    """Whether ``obj.a.b.c`` exists for ``target="a.b.c"``."""
    try:
        get_path(obj, target)
        return True
    except AttributeError:
        return False


def stage_graph(gm: GraphModule, spec, n_stages: int) -> Graph:
    """The graph of one pipeline stage: ``forward(*model_inputs, *received)`` returning the values
    it sends (``spec.outputs``) and, on the last stage, the model's output leaves. Node names and
    metadata are the global graph's, so per-rank calls and reports carry over."""
    from .stages import stage_nodes

    keep = stage_nodes(gm, spec, n_stages)
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda a: env[a])
    for name in spec.inputs:
        src = by_name[name]
        env[src] = graph.placeholder(name)
        # the value's description, not the producing op's per-rank call
        env[src].meta = {k: v for k, v in src.meta.items() if k != LOCAL}
    for node in gm.graph.nodes:
        if node in env or node.op in ("placeholder", "output"):
            continue
        if node in keep or (node.op == "get_attr" and any(u in keep for u in node.users)):
            env[node] = new = graph.node_copy(node, lambda a: env[a])
            if LOCAL in node.meta:  # per-rank calls name the nodes of this graph too
                remap = lambda a: env.get(a, a) if isinstance(a, torch.fx.Node) else a  # noqa: E731
                new.meta[LOCAL] = {
                    r: None if c is None else LocalCall(c.target, map_aggregate(c.args, remap), map_aggregate(c.kwargs, remap))
                    for r, c in node.meta[LOCAL].items()
                }
    outs = [env[by_name[name]] for name in spec.outputs]
    if spec.index == n_stages - 1:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        leaves = output.args[0]
        outs += [env[x] if isinstance(x, torch.fx.Node) else x for x in (leaves if isinstance(leaves, (list, tuple)) else [leaves])]
    graph.output(tuple(outs))
    graph.lint()
    return graph
