"""The repeated blocks of a model, read off the graph: the outermost run of sibling modules of one
class (``transformer.h.0``, ``transformer.h.1``, ...: the layers of a ``ModuleList``).

Recomputation remakes a block's activations from its input (``passes/plan_recompute.py``), and
zero gathers a block's weights in one collective (``passes/gather_weights.py``); the memory model
counts what either holds at once. Blocks come from ``nn_module_stack`` and the class of each
module, never from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate


def stack(node: Node) -> list[tuple[str, str]]:
    """``(module path, class)`` of the modules a node ran in, outermost first."""
    return [v if isinstance(v, tuple) else (v, "") for v in (node.meta.get("nn_module_stack") or {}).values()]


def innermost(node: Node) -> str:
    """The path of the innermost module a node ran in (its own name outside every module)."""
    s = stack(node)
    return s[-1][0] if s else node.name


def _nodes(g: GraphModule | Graph):
    return g.graph.nodes if isinstance(g, GraphModule) else g.nodes


def repeated_blocks(gm: GraphModule | Graph) -> set[str]:
    """The paths of the blocks: of the runs of at least two sibling modules of one class whose
    names are their indices, the outermost ones."""
    kinds: dict[tuple, set] = {}
    for node in _nodes(gm):
        for path, kind in stack(node):
            parent, _, last = path.rpartition(".")
            if last.isdigit():
                kinds.setdefault((parent, kind), set()).add(path)
    runs = [paths for paths in kinds.values() if len(paths) >= 2]
    if not runs:
        return set()
    depth = min(min(p.count(".") for p in paths) for paths in runs)
    return {p for paths in runs for p in paths if p.count(".") == depth}


def is_fxpar_op(target) -> bool:
    """A collective or other op fxpar inserted (``torch.ops.fxpar.*``)."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fxpar"


def owners(gm: GraphModule | Graph, paths: set[str]) -> dict[Node, str | None]:
    """For every op, the module of ``paths`` it runs in (None: none of them). A collective fxpar
    inserted goes with the op that reads it: it carries the module of the value it converts, but
    runs where that value is read (the all-gather of a sequence-parallel layer's output runs
    inside the next layer's norm)."""
    order = {n: i for i, n in enumerate(_nodes(gm))}
    owner: dict[Node, str | None] = {}
    for node in reversed(_nodes(gm)):
        if node.op not in ("call_function", "call_module"):
            continue
        if is_fxpar_op(node.target) and node.users:
            owner[node] = owner.get(min(node.users, key=order.get))
        else:
            owner[node] = next((path for path, _ in stack(node) if path in paths), None)
    return owner


def even_cuts(gm: GraphModule, stages: int) -> list[str]:
    """The blocks to cut before so that ``stages`` pipeline stages get as even a share of the
    repeated blocks as they divide into (the first stages one fewer where they do not): the cut
    Megatron-LM and torchtitan make, as ``split_points``."""
    order: dict[str, int] = {}
    paths = repeated_blocks(gm)
    for i, node in enumerate(gm.graph.nodes):
        for path, _ in stack(node):
            if path in paths:
                order.setdefault(path, i)
    blocks = sorted(order, key=order.get)
    if stages <= 1 or len(blocks) < stages:
        return []
    cuts, start = [], 0
    for j in range(stages - 1):
        start += (len(blocks) + j) // stages  # the remainder goes to the last stages
        cuts.append(blocks[start])
    return cuts


@dataclass
class Copy:
    """A repeated block whose ops are another block's (its ``template``, earlier in the graph) one
    for one: the same ops on the same shapes and constants, wired the same way. ``inputs`` maps the
    values the template reads from outside it to the ones this block reads in their place."""

    template: list[Node]
    nodes: list[Node]
    inputs: dict[Node, Node]


def copies(graph: Graph) -> list[Copy]:
    """Every repeated block that repeats an earlier one exactly (``fxpar/blocks.py``'s blocks,
    compared op by op): an analysis can take a copy's results from its template, node by node,
    instead of working them out again (80 layers of a 70B model are one block and 79 copies).

    A block's values from outside it (its input, the weights it reads) are numbered by first
    use, so two blocks match when they read their own weights the same way."""
    paths = repeated_blocks(graph)
    if not paths:
        return []
    members: dict[str, list[Node]] = {}
    for node, path in owners(graph, paths).items():
        if path is not None:
            members.setdefault(path, []).append(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first: dict[str, tuple[list[Node], list[Node]]] = {}
    out = []
    blocks = sorted((sorted(nodes, key=order.get) for nodes in members.values()), key=lambda ns: order[ns[0]])
    for nodes in blocks:
        key, outside = _signature(nodes)
        if key not in first:
            first[key] = (nodes, outside)
            continue
        template, template_outside = first[key]
        out.append(Copy(template, nodes, dict(zip(template_outside, outside))))
    return out


def _signature(nodes: list[Node]) -> tuple[str, list[Node]]:
    """A block's structure as text (ops, constants, shapes, and its wiring with the nodes inside
    numbered by position and those outside by first use), and the outside nodes in that order."""
    inside = {n: i for i, n in enumerate(nodes)}
    outside: dict[Node, int] = {}

    def wire(a):
        if not isinstance(a, Node):
            return a
        return ("in", inside[a]) if a in inside else ("out", outside.setdefault(a, len(outside)))

    parts = []
    for n in nodes:
        val = n.meta.get("val")
        described = (tuple(str(d) for d in val.shape), val.dtype) if isinstance(val, torch.Tensor) else type(val)
        parts.append((n.op, n.target, map_aggregate(n.args, wire), map_aggregate(n.kwargs, wire), described))
    return repr(parts), list(outside)
