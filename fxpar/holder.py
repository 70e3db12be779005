"""Put one rank's tensors into a module under the model's original names."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .capture import Captured
from .codegen import get_path
from .placement import REPLICATE
from .shards import init_tensor, missing_buffer_error, param_roles, shard_tensor


def set_path(root: nn.Module, target: str, value, persistent: bool = True) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        child = getattr(mod, part, None) if part in mod._modules else None
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


def populate(
    root: nn.Module,
    cap: Captured,
    placements: dict,
    rank: int,
    source: nn.Module | None,
    device,
    *,
    seed: int = 0,
    init_fn=None,
    keep: set[str] | None = None,
    unused: bool = True,
    outer: dict | None = None,
    zeros=frozenset(),
) -> dict[str, str]:
    """Register rank ``rank``'s parameters and buffers in ``root`` under every original name.

    Tensors come from ``source`` (sliced) when it holds real values, else from ``init_fn`` or the
    seeded initialization. ``keep`` limits it to the tensors the graph reads by those names (a
    pipeline stage's); ``unused`` also registers the tensors forward never reads. ``outer`` maps
    names to a ``(placement, rank)`` split taken before ``placements`` (an ep rank's experts of a
    stacked weight, then the tp rank's part of them); ``init_fn`` is asked for such a tensor
    whole. Buffers named in ``zeros`` (a key/value cache) start as zeros. Returns ``{graph name:
    user-facing name}`` for the parameters.
    """
    outer = outer or {}
    roles = param_roles(cap.gm)
    missing, names, done = [], {}, set()
    used = cap.used
    entries = [(n.target, get_path(cap.gm, n.target)) for n in cap.gm.graph.nodes
               if n.op == "get_attr" and (keep is None or n.target in keep)]
    if unused:  # what forward never reads still belongs to the model's state: kept whole
        entries += [(name, t) for name, t in cap.tensors.items() if cap.graph_name(name) not in used]
    for target, meta_obj in entries:
        if not isinstance(meta_obj, torch.Tensor) or target in done:
            continue
        aliases = cap.aliases.get(target)
        place = placements.get(target, REPLICATE)
        if aliases is None:  # a constant the capture lifted out of forward
            set_path(root, target, shard_tensor(meta_obj, place, rank).to(device), persistent=False)
            done.add(target)
            continue
        done.update(aliases)
        # the model's tensor as the rank holds it: under a compute precision the graph reads a
        # cast of it, and the rank holds the fp32 master
        meta_obj = cap.tensors.get(aliases[0], meta_obj)
        orig = _lookup(source, aliases) if source is not None else None
        is_param = isinstance(meta_obj, nn.Parameter)
        split = outer.get(target)
        made = None
        if (orig is None or orig.device.type == "meta") and init_fn is not None:
            if split is None:
                made = init_fn(aliases[0], tuple(meta_obj.shape), meta_obj.dtype, place, rank)
            else:
                whole = init_fn(aliases[0], tuple(meta_obj.shape), meta_obj.dtype, REPLICATE, 0)
                made = None if whole is None else shard_tensor(shard_tensor(whole, *split), place, rank)
        if orig is not None and orig.device.type != "meta":
            local = shard_tensor(orig if split is None else shard_tensor(orig, *split), place, rank)
            local = local.to(device, meta_obj.dtype)
        elif made is not None:
            local = made.to(device, meta_obj.dtype)
        elif is_param:
            role = roles.get(target, "normal" if meta_obj.dim() >= 2 else "zeros")
            local = init_tensor(target, meta_obj.shape, meta_obj.dtype, place, rank, seed, role, device, outer=split)
        elif target in zeros:
            local = torch.zeros_like(shard_tensor(meta_obj, place, rank), device=device)
        else:
            if target in used:  # a buffer forward never reads can stay without values
                missing.append(aliases[0])
            continue
        value = nn.Parameter(local, requires_grad=meta_obj.requires_grad) if is_param else local
        for alias in aliases:
            set_path(root, alias, value, persistent=cap.persistent.get(alias, True))
        if is_param:
            names[target] = aliases[0]
    if missing:
        raise missing_buffer_error(missing)
    return names


def _lookup(source: nn.Module, aliases: list[str]):
    for a in aliases:
        try:
            return get_path(source, a)
        except AttributeError:
            continue
    return None


def retarget_submodules(template: GraphModule, device) -> dict[str, nn.Module]:
    """Copies of the graph's own submodules (bodies of higher-order ops) with device arguments
    pointing at ``device`` instead of the meta device they were captured on."""
    out = {}
    for name, mod in template.named_children():
        if isinstance(mod, GraphModule):
            m = copy.deepcopy(mod)
            for node in m.graph.nodes:
                node.args = torch.fx.node.map_aggregate(node.args, lambda a: device if isinstance(a, torch.device) else a)
                node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: device if isinstance(a, torch.device) else a)
            m.recompile()
            out[name] = m
    return out
