"""Pass (rewrite): expert parallelism — each ep rank holds ``1/ep`` of every mixture-of-experts
layer's experts; tokens travel to their experts' ranks by all-to-all and come back by another.

Runs when the mesh has ``ep > 1`` (``fxpar/pipeline.py`` says when each pass runs). The ep ranks are
data-parallel replicas for everything else: the graph is captured for one replica's part of the
batch, its dense weights are replicated (their gradients averaged over dp x ep after backward,
as data parallelism does), and only the experts' computations change. Reads ``val``; writes a
graph in which every expert region is fed by a dispatch and read through a combine
(``fxpar/ops/experts.py``, ``fxpar_comm`` with ``group="ep"``), ``ctx.expert_layers``,
``ctx.expert_shards`` and ``ctx.expert_slots``, and new ``val``s (what an ep rank's experts
receive is known only at run time).

How experts are found, from the data flow alone. An *expert region* starts at the rows of the
tokens a router picked and is the largest set of ops after it that keep those rows (every value
has the same first dim) and read nothing but them, weights and the experts' offsets. Two forms:

* **grouped** — a grouped matmul ``grouped_mm(x, W, offs)`` (``aten._grouped_mm``, Hugging
  Face's ``grouped_mm_fallback``): ``x`` holds the routed rows sorted by expert, ``offs`` their
  cumulative counts over the ``E`` experts, ``W`` a stacked weight ``(E, ...)``. The region from
  ``x`` holds every grouped matmul with those offsets. Its stacked weights are split by expert
  over the ep ranks (``Shard(0)``: rank ``q`` holds experts ``q*E/ep ..``), ``x`` and ``offs``
  go through ``dispatch``, the region's result through ``combine``.
* **modules** — rows picked by a data-dependent index, ``x[token_ids]`` (the tokens
  ``torch.where`` gave one expert), followed by matmuls with weights: one region per expert, the
  experts of a layer being the regions that index the same ``x``. They must be alike (same ops,
  same weight shapes). One ``dispatch_rows`` sends all of a layer's rows, ep rank ``q`` runs the
  regions of experts ``q*L .. q*L+L-1`` (``L = E/ep``), one ``combine_rows`` brings every
  expert's result back. The graph keeps the first ``L`` regions; on ep rank ``q`` their weights
  are those of its own experts (``ctx.expert_slots``: the graph's weight -> each rank's).

Everything outside the regions — the router, the top-k, the weighting and summing of the
experts' outputs — runs as written on each rank's own tokens, so the parallel model computes what
the single-device model does with no capacity and no dropped tokens. What it guarantees: every
layer it recognizes is rewritten whole or planning stops with an error naming the layer; with
none recognized planning stops too. Experts written another way (rows cut with ``torch.split``
by counts, rows padded per expert) stay replicated over ep, each rank running them on its own
tokens: correct, with every expert on every ep rank.
"""

from __future__ import annotations

import heapq
import operator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from fxpar.codegen import get_path
from fxpar.errors import PlanError, describe_node, module_path
from fxpar.fake_values import propagate
from fxpar.memory import expr
from fxpar.metadata import COMM, CommInfo, copy_meta
from fxpar.placement import Shard
from fxpar.plan_context import ExpertLayer, PlanContext
from fxpar.rules import WEIGHT_TRANSPARENT, is_weight
from fxpar.rules.base import is_tensor_node, shape, static
from fxpar.rules.matmul import grouped_ops
from fxpar.ops import experts as X

aten = torch.ops.aten


def expert_parallel(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    """Split every mixture-of-experts layer's experts over the ep ranks (see the module doc)."""
    ep = ctx.mesh.ep
    graph = gm.graph
    grouped, modules = list(_grouped_layers(gm)), list(_module_layers(gm))  # found before any rewrite
    dispatches = [_grouped(gm, ctx, *layer) for layer in grouped] + [_modules(gm, ctx, layer) for layer in modules]
    if not dispatches:
        raise PlanError(
            f"{ctx.mesh} splits the experts of mixture-of-experts layers over ep={ep} ranks, but this model has "
            "none that fxpar recognizes (experts are matmuls on the rows a router picked: x[token_ids] fed to one "
            "module per expert, or grouped matmuls with per-expert offsets): use dp instead of ep for this model"
        )
    _reorder(graph)
    graph.lint()
    gm.recompile()
    propagate(gm, gm, ctx.mesh)
    _describe_traffic(gm, dispatches, ep)
    return gm


# finding the experts --------------------------------------------------------------------------
def _offsets(node: Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")


def _rows_of(node: Node):
    v = node.meta.get("val")
    leaves = [t for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]
    return {expr(t.shape[0]) if t.dim() else None for t in leaves}


def _region(seed: Node, extra: set, position: dict) -> list[Node]:
    """The ops after ``seed`` that keep its rows and read only them, weights and ``extra``
    (sizes and assertions read from values inside belong to it too), in graph order."""
    rows = _rows_of(seed)
    inside, region = {seed}, []
    frontier = [(position[u], u) for u in seed.users]
    heapq.heapify(frontier)
    seen = set(seed.users)
    while frontier:  # the nodes reachable from the seed, in graph order
        _, n = heapq.heappop(frontier)
        ins = n.all_input_nodes
        if n.op == "call_function" and all(
            i in inside or i in extra or is_weight(i) or not is_tensor_node(i) for i in ins
        ) and any(i in inside for i in ins):
            mine = _rows_of(n)
            if mine == rows or not mine:
                inside.add(n)
                region.append(n)
                for u in n.users:
                    if u not in seen:
                        seen.add(u)
                        heapq.heappush(frontier, (position[u], u))
    return region


def _weights(region: list[Node], skip: set) -> list[Node]:
    """The ``get_attr`` nodes the region reads (through views and casts), in order of use."""
    out = []
    for node in region:
        for a in node.all_input_nodes:
            if a in skip or a in region or not is_weight(a):
                continue
            while a.op == "call_function":
                a = a.args[0]
            if a not in out:
                out.append(a)
    return out


def _outputs(region: list[Node]) -> list[Node]:
    """The tensors the region gives to the rest of the graph."""
    inside = set(region)
    return [n for n in region if _rows_of(n) and any(u not in inside for u in n.users)]


def _closed(region: list[Node], outs: list[Node], name: str) -> None:
    """Nothing but ``outs`` leaves the region (a size read inside and used after would be lost)."""
    inside = set(region)
    for n in region:
        if n not in outs and any(u not in inside for u in n.users):
            raise PlanError(
                f"expert parallelism: '{name}': a value of an expert is used after it other than as its result, "
                f"so the expert cannot run on another rank\n  {describe_node(n)}"
            )


def _layer_name(node: Node) -> str:
    return module_path(node) or node.name


def _grouped_layers(gm: GraphModule):
    ops = grouped_ops()
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_offsets: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops and isinstance(_offsets(node), Node):
            by_offsets.setdefault(_offsets(node), []).append(node)
    for offs, mms in by_offsets.items():
        seed = mms[0].args[0]
        region = _region(seed, {offs}, position)
        missing = [m for m in mms if m not in region]
        if missing:
            raise PlanError(
                "expert parallelism: the grouped matmuls with these offsets do not form one region that keeps the "
                f"routed rows (this one reads other values): fxpar cannot send its rows to the experts' ranks\n  "
                f"{describe_node(missing[0])}"
            )
        yield seed, offs, region


def _module_layers(gm: GraphModule):
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_source: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.index.Tensor and _picks_rows(node):
            region = _region(node, set(), position)
            if any(is_weight(a) for n in region for a in n.all_input_nodes):
                by_source.setdefault(node.args[0], []).append((node, region))
    for experts in by_source.values():
        if len(experts) > 1:  # one gather feeding a matmul is no mixture of experts
            yield experts


def _picks_rows(node: Node) -> bool:
    """``x[token_ids]``: rows of a 2-d activation picked by a 1-d index known at run time."""
    x, idx = node.args[0], node.args[1]
    if not (isinstance(x, Node) and is_tensor_node(x) and not is_weight(x) and len(idx) == 1 and isinstance(idx[0], Node)):
        return False
    v, i = x.meta["val"], idx[0].meta.get("val")
    return (v.dim() == 2 and v.is_floating_point() and isinstance(i, torch.Tensor) and i.dim() == 1
            and _run_time_size(i.shape[0]))


def _run_time_size(size) -> bool:
    """A size known only when the program runs (``u0``: what ``torch.where`` returns), not a
    symbolic batch or sequence length."""
    return isinstance(size, torch.SymInt) and any(str(s).startswith("u") for s in size.node.expr.free_symbols)


# rewriting ------------------------------------------------------------------------------------
def _ep_call(graph, anchor: Node, fn, args, kwargs, like: Node) -> Node:
    with graph.inserting_after(anchor):
        node = graph.call_function(fn, args, kwargs)
    copy_meta(like, node)
    return node


def _items(graph, node: Node, n: int) -> list[Node]:
    out = []
    for i in range(n):
        with graph.inserting_after(node):
            item = graph.call_function(operator.getitem, (node, i))
        copy_meta(node, item)
        out.append(item)
    return out


def _rows_node(graph, node: Node) -> Node:
    """``node.shape[0]`` as a graph value: what a combine gives back is sized by what its dispatch
    took, with no data dependency on it (a tensor input would carry gradients)."""
    with graph.inserting_after(node):
        size = graph.call_function(aten.sym_size.int, (node, 0))
    copy_meta(node, size)
    return size


def _split_count(E: int, ep: int, name: str, node: Node) -> int:
    if E % ep:
        raise PlanError(
            f"expert parallelism: layer '{name}' has {E} experts, which do not split evenly over ep={ep} ranks: "
            f"use an ep that divides {E}\n  {describe_node(node)}"
        )
    return E // ep


def _grouped(gm: GraphModule, ctx: PlanContext, seed: Node, offs: Node, region: list[Node]) -> Node:
    graph, ep = gm.graph, ctx.mesh.ep
    E = static(shape(offs)[0])
    name = _layer_name(region[0])
    if E is None:
        raise PlanError(f"expert parallelism: the number of experts of '{name}' (offsets {shape(offs)}) is not a "
                        f"fixed number\n  {describe_node(region[0])}")
    _split_count(E, ep, name, region[0])
    outs = _outputs(region)
    if len(outs) != 1:
        raise PlanError(f"expert parallelism: the experts of '{name}' give {len(outs)} results, not one\n  {describe_node(region[0])}")
    _closed(region, outs, name)
    weights = _weights(region, {seed, offs})
    for w in weights:
        if static(shape(w)[0]) != E or not _only_read_by(w, set(region)):
            raise PlanError(
                f"expert parallelism: '{w.target}' is read by the grouped matmuls of '{name}' but is not one stacked "
                f"weight per expert (dim 0 of {E}) read by them alone\n  {describe_node(region[0])}"
            )
    anchor = max((seed, offs), key=_position)
    d = _ep_call(graph, anchor, X.dispatch, (seed, offs), {"group": "ep", "layer": name}, region[0])
    rows, local_offs, splits = _items(graph, d, 3)
    for node in region:
        node.replace_input_with(seed, rows)
        node.replace_input_with(offs, local_offs)
    (y,) = outs
    c = _ep_call(graph, y, X.combine, (y, splits, _rows_node(graph, seed)), {"group": "ep"}, y)
    for user in list(y.users):
        if user is not c and user not in region:
            user.replace_input_with(y, c)
    for w in weights:
        _keep_experts(gm, w.target, E, ep)
        ctx.expert_shards[w.target] = Shard.even(0, E, ep)
    ctx.expert_layers.append(ExpertLayer(name, E, "grouped", d.name))
    return d


def _modules(gm: GraphModule, ctx: PlanContext, experts: list) -> Node:
    graph, ep = gm.graph, ctx.mesh.ep
    seeds = [s for s, _ in experts]
    regions = [r for _, r in experts]
    name = _common_module(regions)
    L = _split_count(len(experts), ep, name, regions[0][0])
    template = _signature(seeds[0], regions[0])
    for seed, region in experts[1:]:
        if _signature(seed, region) != template:
            raise PlanError(
                f"expert parallelism: the experts of '{name}' are not alike (other ops or weight shapes), so one rank's "
                f"program cannot run another's experts\n  {describe_node(region[0])}"
            )
    outs = []
    for region in regions:
        o = _outputs(region)
        if len(o) != 1:
            raise PlanError(f"expert parallelism: an expert of '{name}' gives {len(o)} results, not one\n  {describe_node(region[0])}")
        _closed(region, o, name)
        outs.append(o[0])
    weights = [_weights(r, {s}) for s, r in experts]
    own = _own_weights(weights, regions, name)
    d = _ep_call(graph, seeds[-1], X.dispatch_rows, (list(seeds),), {"group": "ep", "layer": name}, seeds[0])
    *received, splits = _items(graph, d, L + 1)
    for j in range(L):
        for node in regions[j]:
            node.replace_input_with(seeds[j], received[j])
    sizes = [_rows_node(graph, s) for s in seeds]
    c = _ep_call(graph, outs[L - 1], X.combine_rows, (outs[:L], splits, sizes), {"group": "ep"}, outs[0])
    back = _items(graph, c, len(experts))
    for e, y in enumerate(outs):
        for user in list(y.users):
            if user is not c and user not in regions[e]:
                user.replace_input_with(y, back[e])
    for region in regions[L:]:
        for node in reversed(region):
            graph.erase_node(node)
    for ws in weights[L:]:
        for k, w in enumerate(ws):
            if own[k]:
                _erase_unused(graph, w)
    for j in range(L):
        for k, w in enumerate(weights[j]):
            if own[k]:
                ctx.expert_slots[w.target] = tuple(weights[q * L + j][k].target for q in range(ep))
                ctx.expert_held.update({t: (w.target, q) for q, t in enumerate(ctx.expert_slots[w.target])})
    ctx.expert_layers.append(ExpertLayer(name, len(experts), "modules", d.name))
    return d


def _own_weights(weights: list[list[Node]], regions: list[list[Node]], name: str) -> list[bool]:
    """Per weight position of an expert, whether every expert has its own (split over ep) or all
    share one (kept whole on every rank, like any dense weight). An expert's own weight must be
    read by its region alone: another reader would see another rank's expert."""
    own = []
    for k in range(len(weights[0])):
        targets = {ws[k].target for ws in weights}
        if len(targets) == 1:
            own.append(False)
            continue
        if len(targets) != len(weights):
            raise PlanError(f"expert parallelism: the experts of '{name}' share some of their weights "
                            f"('{weights[0][k].target}' and others) but not all")
        for ws, region in zip(weights, regions):
            if not _only_read_by(ws[k], set(region)):
                raise PlanError(
                    f"expert parallelism: '{ws[k].target}' belongs to an expert of '{name}' but is also read outside "
                    f"it, so it cannot stay on the expert's rank alone\n  {describe_node(region[0])}"
                )
        own.append(True)
    return own


def _signature(seed: Node, region: list[Node]) -> list:
    pos = {seed: 0, **{n: i + 1 for i, n in enumerate(region)}}

    def norm(a):
        if isinstance(a, Node):
            if a in pos:
                return ("value", pos[a])
            v = a.meta.get("val")
            return ("weight", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("other", a.op)
        if isinstance(a, (list, tuple)):
            return type(a)(norm(x) for x in a)
        if isinstance(a, dict):
            return {k: norm(x) for k, x in a.items()}
        if isinstance(a, torch.SymInt):
            return ("size",)
        return a

    return [(n.target, norm(n.args), norm(n.kwargs)) for n in region]


def _common_module(regions: list[list[Node]]) -> str:
    """The innermost module holding every expert of a layer (``layers.0.moe.experts``)."""
    paths = [module_path(r[0]).split(".") for r in regions if module_path(r[0])]
    if not paths:
        return regions[0][0].name
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common) or regions[0][0].name


def _only_read_by(w: Node, region: set) -> bool:
    frontier = [w]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in region:
                continue
            if u.op == "call_function" and u.target in WEIGHT_TRANSPARENT:
                frontier.append(u)
                continue
            return False
    return True


def _erase_unused(graph, node: Node) -> None:
    """Erase ``node`` and what only it used, once nothing reads it (an expert's weight, viewed)."""
    if node.users:
        for u in list(node.users):
            if u.op == "call_function" and u.target in WEIGHT_TRANSPARENT:
                _erase_unused(graph, u)
    if not node.users:
        graph.erase_node(node)


def _keep_experts(gm: GraphModule, target: str, E: int, ep: int) -> None:
    """Make the graph's attribute ``target`` one ep rank's experts: ``(E/ep, ...)`` on meta."""
    obj = get_path(gm, target)
    local = torch.empty((E // ep, *obj.shape[1:]), dtype=obj.dtype, device="meta")
    *path, leaf = target.split(".")
    owner = get_path(gm, ".".join(path)) if path else gm
    if isinstance(obj, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(local, requires_grad=obj.requires_grad))
    else:
        owner.register_buffer(leaf, local)


def _position(node: Node) -> int:
    i, n = 0, node
    while n.op != "root":
        n, i = n.prev, i + 1
    return i


def _reorder(graph) -> None:
    """Order the nodes so that every node follows its inputs, keeping the present order wherever
    it already does (the new dispatches read rows made after the first experts used them)."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (index[u], u))
    if len(order) != len(nodes):
        raise PlanError("expert parallelism: the rewritten graph has a cycle (a bug in fxpar)")
    output = order[-1]
    for n in order[:-1]:
        output.prepend(n)


# reports ---------------------------------------------------------------------------------------
def _describe_traffic(gm: GraphModule, dispatches: list[Node], ep: int) -> None:
    """``fxpar_comm`` of every dispatch and combine: what a rank sends at a balanced router's load
    (each rank's experts get as many rows as it sends, ``(ep-1)/ep`` of them to other ranks)."""

    def leaving(values):
        values = values if isinstance(values, list) else [values]
        elements = sum(expr(v.meta["val"].numel()) for v in values)
        sent = (ep - 1) * sum(expr(v.meta["val"].numel()) * v.meta["val"].element_size() for v in values) / ep
        return elements, int(sent) if isinstance(sent, (int, float)) else sent

    for d in dispatches:
        elements, sent = leaving(d.args[0])
        d.meta[COMM] = CommInfo("all_to_all", "ep", elements, sent, sent, "tokens", "experts")
        combines = {u for item in d.users for u in item.users if u.target in (X.combine, X.combine_rows)}
        for c in combines:
            elements, sent = leaving(c.args[0])
            c.meta[COMM] = CommInfo("all_to_all", "ep", elements, sent, sent, "experts", "tokens")
