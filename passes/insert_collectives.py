"""Pass (rewrite): make every change of placement an explicit collective node.

Reads ``fxpar_placement`` (what each producer gives), ``fxpar_inputs`` (what each consumer takes)
and ``fxpar_requires_grad``. For each edge where the two differ it inserts one call to a function
of ``fxpar.ops.collectives``, shared by every consumer that needs the same conversion:

=========  =================  ==================================================
producer   consumer wants     node inserted
=========  =================  ==================================================
P          R                  ``all_reduce``
P          S                  ``reduce_scatter``
S          R                  ``all_gather``
R          S                  ``shard`` (local slice; all-gathers in backward)
R          P                  ``to_partial`` (the bias of a row-parallel matmul)
S          P                  ``shard_to_partial`` (own slice, zeros elsewhere)
S          S' (each rank's     ``pick_local`` (no communication)
           part of S)
S          S' (other layout)  ``redistribute``
=========  =================  ==================================================

(right before the first consumer) and, where a replicated value that can carry a gradient feeds
an op whose output is sharded or partial, a ``copy_to_tp`` (identity forward, all-reduce backward: each rank's backward only sees
its own shard's share of that gradient). Where the value is rows picked out of another
(``x[idx]``: the tokens an expert got, each token's top-k rows) the ``copy_to_tp`` goes on ``x``
instead, once for every pick, when that is no larger. An ``all_gather`` whose only use is such a
``copy_to_tp`` becomes one ``gather_to_tp`` (all-gather forward, reduce-scatter backward: the
same gradient for half the bytes), the gather of sequence parallelism. Inserted nodes get ``fxpar_comm`` with their sizes,
``fxpar_placement`` of what they produce and ``fxpar_origin = None``; consumers' ``fxpar_inputs``
are re-keyed to them. Every other node gets ``fxpar_origin`` = its own name.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from fxpar.errors import PlanError, describe_node, module_path
from fxpar.layout_algebra import holds_all_of
from fxpar.metadata import COMM, GRAD_PARTIAL, INPUTS, ORIGIN, PLACEMENT, REQUIRES_GRAD, CommInfo, copy_meta, out_placement, replace_uses, splits_output
from fxpar.placement import PARTIAL, REPLICATE, Placement, Shard
from fxpar.plan_context import PlanContext
from fxpar.rules.base import static_numel
from fxpar.rules.writes import mutated_state
from fxpar.ops import collectives as C
from fxpar.ops.library import runs_arg


def conversion(src: Placement, dst: Placement):
    """(function, extra args, kind) converting ``src`` into ``dst``; None if nothing to do."""
    if src == dst:
        return None
    if src is PARTIAL and dst is REPLICATE:
        return C.all_reduce, (), "all_reduce"
    if src is PARTIAL and isinstance(dst, Shard):
        return C.reduce_scatter, (dst.dim, dst.size, runs_arg(dst)), "reduce_scatter"
    if isinstance(src, Shard) and dst is REPLICATE:
        return C.all_gather, (src.dim, src.size, runs_arg(src)), "all_gather"
    if src is REPLICATE and isinstance(dst, Shard):
        return C.shard, (dst.dim, dst.size, runs_arg(dst)), "shard"
    if src is REPLICATE and dst is PARTIAL:
        return C.to_partial, (), "to_partial"
    if isinstance(src, Shard) and dst is PARTIAL:
        return C.shard_to_partial, (src.dim, src.size, runs_arg(src)), "shard_to_partial"
    if isinstance(src, Shard) and isinstance(dst, Shard) and holds_all_of(src, dst):
        return C.pick_local, (src.dim, src.size, runs_arg(src), dst.dim, dst.size, runs_arg(dst)), "pick_local"
    if isinstance(src, Shard) and isinstance(dst, Shard):
        extra = (src.dim, src.size, runs_arg(src), dst.dim, dst.size, runs_arg(dst))
        a2a = src.is_even and dst.is_even and src.dim != dst.dim
        return C.redistribute, extra, "all_to_all" if a2a else "redistribute"
    raise ValueError(f"no conversion from {src} to {dst}")


def _numel(val) -> object:
    n = val.numel()
    return int(n) if not isinstance(n, torch.SymInt) else n.node.expr


def comm_info(kind: str, val, world: int, src: Placement, dst: Placement, group: str = "tp") -> CommInfo:
    """Bytes one rank sends with a ring algorithm (forward, backward); ``val`` is the global value."""
    n = _numel(val)
    e = val.element_size()
    ring = (world - 1) / world
    fwd, bwd = {
        "all_reduce": (2 * ring, 0),
        "copy_to_tp": (0, 2 * ring),
        "all_gather": (ring, 0),
        "gather_to_tp": (ring, ring),
        "shard": (0, ring),
        "reduce_scatter": (ring, ring),
        "redistribute": (ring, ring),
        "all_to_all": (ring / world, ring / world),  # of its own 1/world of the value
        "to_partial": (0, 0),
        "shard_to_partial": (0, 0),
        "pick_local": (0, 0),
        "sum_duplicates": (0, 2 * ring),  # of the shared rows only (``nbytes`` says how many)
    }[kind]
    return CommInfo(kind, group, n, fwd * n * e, bwd * n * e, repr(src), repr(dst))


def insert_collectives(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    world, group = ctx.world, ctx.group
    for node in graph.nodes:
        node.meta[ORIGIN] = node.name
    cache: dict[tuple, Node] = {}

    def convert(node: Node, inp: Node, fn, extra, kind, have, want) -> Node:
        key = (inp, kind, extra)
        if key not in cache:
            with graph.inserting_before(node):
                new = graph.call_function(fn, (inp, *extra), {"group": group})
            copy_meta(inp, new)
            new.meta.update(
                {
                    "val": inp.meta["val"],
                    PLACEMENT: want,
                    INPUTS: {inp.name: have},
                    REQUIRES_GRAD: inp.meta.get(REQUIRES_GRAD, False),
                    ORIGIN: None,
                    COMM: comm_info(kind, inp.meta["val"], world, have, want, group),
                }
            )
            cache[key] = new
        return cache[key]

    for node in list(graph.nodes) if world > 1 else []:
        reqs = node.meta.get(INPUTS)
        if COMM in node.meta and node.meta[COMM].group != group:
            # another dimension's collective (context parallelism's) moves this rank's part only
            node.meta[COMM] = _share(node.meta[COMM], out_placement(node))
        if not reqs or (COMM in node.meta and node.meta[COMM].group == group):
            continue
        for inp in list(node.all_input_nodes):
            if inp.name not in reqs:
                continue
            want = reqs[inp.name]
            have = out_placement(inp) or REPLICATE
            new = inp
            conv = conversion(have, want)
            if conv is not None and inp in mutated_state(node):
                raise PlanError(
                    f"{describe_node(node)} writes into {inp.name} in place, which each rank holds as {have}, but the "
                    f"write needs it {want}: a converted copy would take the write and lose it. Store the tensor "
                    f"as the write needs it (overrides={{{module_path(node)!r}: 'replicate'}} keeps the values "
                    "whole), or write with an op that returns a new tensor"
                )
            if conv is not None:
                new = convert(node, inp, *conv, have, want)
            # whole on every rank but used by a sharded op: each rank's backward sees only its
            # own share of the gradient, whatever made the value whole (nothing, an all-reduce,
            # an all-gather), so sum it over the ranks on the way back
            if want is REPLICATE and splits_output(node) and inp.meta.get(REQUIRES_GRAD):
                picked = _picked_rows(inp) if new is inp else None
                if picked is not None:
                    # rows picked out of one value several times (the tokens each expert got):
                    # one all-reduce of the value's gradient serves every pick
                    chain, source = picked
                    index = chain[-1]
                    for n in chain:  # their gradients are each rank's part until the all-reduce
                        n.meta[GRAD_PARTIAL] = True
                    if _in_group(source, C.copy_to_tp, group):
                        continue
                    copy = convert(index, source, C.copy_to_tp, (), "copy_to_tp", REPLICATE, REPLICATE)
                    index.replace_input_with(source, copy)
                    ireqs = dict(index.meta.get(INPUTS) or {})
                    ireqs[copy.name] = ireqs.pop(source.name, REPLICATE)
                    index.meta[INPUTS] = ireqs
                    continue
                new = convert(node, new, C.copy_to_tp, (), "copy_to_tp", REPLICATE, REPLICATE)
            if new is inp:
                continue
            node.replace_input_with(inp, new)
            reqs = dict(reqs)
            del reqs[inp.name]
            reqs[new.name] = want
            node.meta[INPUTS] = reqs
    _fuse_gathers(graph, world, group)
    if world > 1:
        _sum_duplicates(graph, world, group)
    graph.lint()
    gm.recompile()
    return gm


def _sum_duplicates(graph, world: int, group: str) -> None:
    """A trainable weight stored so that ranks share rows gets ``sum_duplicates`` right after it:
    each owner's gradient of a shared row is the share of its own heads, the true one their sum."""
    for node in list(graph.nodes):
        place = node.meta.get(PLACEMENT)
        if node.op != "get_attr" or not isinstance(place, Shard) or not place.has_duplicates:
            continue
        if not node.meta.get(REQUIRES_GRAD):
            continue
        with graph.inserting_after(node):
            new = graph.call_function(C.sum_duplicates, (node, place.dim, place.size, runs_arg(place)), {"group": group})
        replace_uses(node, new)
        new.args = (node, *new.args[1:])  # the one use of the weight that stays
        copy_meta(node, new)
        info = comm_info("sum_duplicates", node.meta["val"], world, place, place, group)
        frac = C.shared_count(place) / place.size
        new.meta.update({"val": node.meta["val"], PLACEMENT: place, INPUTS: {node.name: place},
                         REQUIRES_GRAD: True, ORIGIN: None,
                         COMM: dataclasses.replace(info, bwd_bytes=int(info.bwd_bytes * frac))})


# ops that carry a value along unchanged in size: a gradient all-reduce may move past them
_CARRY = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.view.default,
          torch.ops.aten.reshape.default, torch.ops.aten.contiguous.default}


def _picked_rows(node: Node):
    """``(chain, source)`` when ``node`` is rows picked out of ``source`` (``source[idx]``, then
    casts or views, each read by split ops only; ``chain`` runs from ``node`` back to the pick)
    and the picks are worth one all-reduce of
    ``source``'s gradient: ``source`` is picked from more than once (one pick per expert) or this
    pick is at least as large (each token's top-k rows); None otherwise."""
    def feeds_split_only(n):  # readers of values (metadata checks read none)
        readers = [u for u in n.users if isinstance(u.meta.get("val"), torch.Tensor)]
        return len(readers) == 1 or all(splits_output(u) for u in readers)

    chain = [node]
    while node.target in _CARRY and feeds_split_only(node) and isinstance(node.args[0], Node):
        node = node.args[0]
        chain.append(node)
    if node.target is not torch.ops.aten.index.Tensor or not feeds_split_only(node):
        return None
    source = node.args[0]
    if source.target is C.copy_to_tp:  # hoisted already, for another reader of the same rows
        return chain, source
    whole = out_placement(source) is REPLICATE and (node.meta.get(INPUTS) or {}).get(source.name) is REPLICATE
    if not whole or not source.meta.get(REQUIRES_GRAD):
        return None
    picks = [u for u in source.users if u.target is torch.ops.aten.index.Tensor and u.args[0] is source]
    rows, total = static_numel(node), static_numel(source)
    if len(picks) >= 2 or (rows is not None and total is not None and rows >= total):
        return chain, source
    return None


def _share(info: CommInfo, place) -> CommInfo:
    """``info`` for one rank's part of the value under ``place`` (bytes of a shard, not the whole)."""
    if not isinstance(place, Shard):
        return info
    frac = place.local_size / place.size
    return dataclasses.replace(info, bytes=int(info.bytes * frac), bwd_bytes=int(info.bwd_bytes * frac))


def _in_group(node: Node, fn, group: str) -> bool:
    """Whether ``node`` calls collective ``fn`` over mesh dimension ``group``."""
    return node.target is fn and node.kwargs.get("group", "tp") == group


def _fuse_gathers(graph, world: int, group: str) -> None:
    """``copy_to_tp(all_gather(x))`` -> ``gather_to_tp(x)`` where the gather serves nothing else."""
    for node in list(graph.nodes):
        if not _in_group(node, C.copy_to_tp, group):
            continue
        gather = node.args[0]
        if not _in_group(gather, C.all_gather, group) or len(gather.users) != 1:
            continue
        (src,) = gather.meta[INPUTS].values()
        if not src.is_partition:
            continue
        x = gather.args[0]
        with graph.inserting_before(node):
            fused = graph.call_function(C.gather_to_tp, gather.args, gather.kwargs)
        fused.meta.update(gather.meta)
        fused.meta[COMM] = comm_info("gather_to_tp", x.meta["val"], world, src, REPLICATE, group)
        replace_uses(node, fused)
        graph.erase_node(node)
        graph.erase_node(gather)

