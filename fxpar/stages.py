"""Pipeline stages as data: which nodes each stage runs and which values cross between stages.

A stage is a contiguous run of the planned graph's compute nodes. Around them:

* the model's inputs are given to every rank, so any stage reads them directly;
* values that need no parameter and carry no gradient (positions, masks, rotary tables) are
  recomputed by every stage that reads them instead of being sent;
* parameters live in every stage that reads them (a tied embedding/output weight in two stages);
* every other value made in one stage and read in a later one is sent there, and its gradient
  comes back.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from .memory import StageMemory
from .metadata import COMM, REQUIRES_GRAD
from .rules.base import is_tensor_node
from .ops.local import dropout



@dataclass
class StageSpec:
    """Stage ``index`` on pipeline rank ``rank``: its compute nodes, the values it receives
    (``inputs``, each from ``sources[name]``) and sends (``outputs``, each to ``sinks[name]``),
    the parameters it holds and its memory with ``in_flight`` microbatches."""

    index: int
    rank: int
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    sinks: dict[str, list[int]] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    memory: StageMemory | None = None


@dataclass
class PipelineSpec:
    stages: list[StageSpec]
    schedule: str
    microbatches: int
    virtual: int
    tied: dict[str, list[int]] = field(default_factory=dict)  # parameter -> stages holding it
    sizes: dict = field(default_factory=dict)  # values of symbolic sizes used for the estimates

    def links(self) -> dict[int, tuple[list[int], list[int]]]:
        """Per stage: the stages it receives from and the stages it sends to."""
        out = {}
        for s in self.stages:
            recv = sorted(set(s.sources.values()))
            send = sorted({d for dsts in s.sinks.values() for d in dsts})
            out[s.index] = (recv, send)
        return out


def replicable(gm: GraphModule) -> set[Node]:
    """Nodes every stage can compute for itself: no gradient, no parameter that trains, no
    collective, no random draw, and inputs of the same kind (or the model's inputs)."""
    out: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            out.add(node)
        elif node.op == "get_attr":
            if not node.meta.get(REQUIRES_GRAD):
                out.add(node)
        elif node.op in ("call_function", "call_module"):
            if node.meta.get(REQUIRES_GRAD) or node.meta.get(COMM) or node.target is dropout:
                continue
            if all(i in out for i in node.all_input_nodes):
                out.add(node)
    return out


def compute_nodes(gm: GraphModule, free: set[Node]) -> list[Node]:
    """The nodes stages are cut from, in graph order (a ``getitem`` goes with its producer)."""
    return [
        n for n in gm.graph.nodes
        if n.op in ("call_function", "call_module") and n not in free and n.target is not operator.getitem
    ]


def owner_of(node: Node) -> Node:
    """The compute node whose stage ``node`` belongs to (itself, or the producer of a getitem)."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node


def build_stages(gm: GraphModule, assignment: dict[Node, int], n_stages: int, stage_rank: list[int]) -> list[StageSpec]:
    """Inputs, outputs, parameters and modules of every stage from a node -> stage assignment."""
    from .errors import module_path

    free = replicable(gm)
    stages = [StageSpec(index=j, rank=stage_rank[j], nodes=[]) for j in range(n_stages)]
    for node in gm.graph.nodes:
        if node in assignment:
            stages[assignment[node]].nodes.append(node.name)
            mod = module_path(node)
            if mod and mod not in stages[assignment[node]].modules:
                stages[assignment[node]].modules.append(mod)
    last = n_stages - 1
    for node in gm.graph.nodes:
        users = list(node.users)
        if node.op == "output":
            continue
        for user in users:
            dst = last if user.op == "output" else assignment.get(owner_of(user))
            if dst is None:  # used by a recomputed node: the reader of that decides
                continue
            if node.op == "get_attr":
                if is_tensor_node(node) and node.target not in stages[dst].params:
                    stages[dst].params.append(node.target)
                continue
            if node in free:
                continue
            src = assignment[owner_of(node)]
            if src == dst:
                continue
            spec_in, spec_out = stages[dst], stages[src]
            if node.name not in spec_in.inputs:
                spec_in.inputs.append(node.name)
                spec_in.sources[node.name] = src
            if node.name not in spec_out.outputs:
                spec_out.outputs.append(node.name)
            spec_out.sinks.setdefault(node.name, [])
            if dst not in spec_out.sinks[node.name]:
                spec_out.sinks[node.name].append(dst)
    # parameters read through recomputed nodes (a buffer's slice, a weight's detach) also live there
    for j, s in enumerate(stages):
        needed = _free_closure(gm, s, assignment, free, j, last)
        for n in needed:
            if n.op == "get_attr" and is_tensor_node(n) and n.target not in s.params:
                s.params.append(n.target)
    return stages


def _free_closure(gm, spec: StageSpec, assignment, free, j, last) -> set[Node]:
    """The recomputable nodes stage ``j`` needs."""
    names = set(spec.nodes)
    frontier = [n for n in gm.graph.nodes if n.name in names]
    if j == last:
        frontier += [n for n in gm.graph.nodes if n.op == "output"]
    seen: set[Node] = set()
    while frontier:
        n = frontier.pop()
        for i in n.all_input_nodes:
            if i in free and i not in seen:
                seen.add(i)
                frontier.append(i)
    return seen


def stage_nodes(gm: GraphModule, spec: StageSpec, n_stages: int) -> set[Node]:
    """Every node stage ``spec`` runs: its compute nodes, their getitems and what it recomputes."""
    names = set(spec.nodes)
    assignment = {n: spec.index for n in gm.graph.nodes if n.name in names}
    free = replicable(gm)
    out = set(assignment)
    out |= {n for n in gm.graph.nodes if n.target is operator.getitem and owner_of(n) in out}
    out |= _free_closure(gm, spec, assignment, free, spec.index, n_stages - 1)
    return out
