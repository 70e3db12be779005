"""Reductions and normalizations: they keep a shard on any dimension they do not reduce over.

Summing (or averaging) over the sharded dimension leaves each rank a partial sum, completed by
the one all-reduce the consumer needs anyway; any other reduction over it (max, softmax,
layer_norm over a split hidden size) needs the whole dimension and gathers it.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from ..ops.local import partial_mean
from .base import RuleContext, Sharding, arg, ndim, norm_dim, op_name, shape, tensor_args
from .registry import localizer, output_like, register

aten = torch.ops.aten

_SUMS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default}


def _reduced(node: Node) -> tuple[list[int], bool]:
    """The reduced dims of the input and whether they are kept as size-1 dims."""
    x = node.args[0]
    nd = ndim(x)
    t = node.target
    if t in (aten.sum.default, aten.mean.default):
        return list(range(nd)), False
    if t in (aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default):
        d = arg(node, 1, "dim")
        keep = arg(node, 2, "keepdim", False)
        return (list(range(nd)) if d is None else [norm_dim(d, nd)]), keep
    if t in (aten.var.correction, aten.std.correction):
        dims = arg(node, 1, "dim")
        keep = node.kwargs.get("keepdim", False)
    elif t == aten.linalg_vector_norm.default:
        dims, keep = arg(node, 2, "dim"), arg(node, 3, "keepdim", False)
    else:
        dims, keep = arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
    if dims is None or dims == []:
        return list(range(nd)), keep
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, nd) for d in dims], keep


@register(
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.mean.dim,
    aten.mean.default,
    aten.amax.default,
    aten.amin.default,
    aten.max.dim,
    aten.min.dim,
    aten.argmax.default,
    aten.argmin.default,
    aten.var.correction,
    aten.std.correction,
    aten.logsumexp.default,
    aten.linalg_vector_norm.default,
    aten.prod.dim_int,
    aten.any.dim,
    aten.all.dim,
)
def reduce(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    dims, keep = _reduced(node)
    if p is PARTIAL:
        if node.target in _SUMS:
            return Sharding(PARTIAL, {x: PARTIAL})
        return Sharding(output_like(node, REPLICATE), {x: REPLICATE})
    if not isinstance(p, Shard):
        return Sharding(output_like(node, REPLICATE), {x: REPLICATE})
    if p.dim not in dims:
        out_dim = p.dim if keep else p.dim - sum(d < p.dim for d in dims)
        return Sharding(output_like(node, p.with_dim(out_dim)), {x: p})
    if node.target in _SUMS and node.meta["val"].dtype != torch.bool and p.is_partition:
        # integer sums too (a count of targets): summing them over the ranks is exact
        return Sharding(PARTIAL, {x: p})
    name = op_name(node)
    return Sharding(output_like(node, REPLICATE), {x: REPLICATE}, fallback=f"{name} over the sharded dim")


@localizer(aten.mean.dim, aten.mean.default)
def local_mean(node: Node, rank: int, lctx):
    """A mean over a sharded dim becomes this rank's sum divided by the global count."""
    x = node.args[0]
    p = lctx.inp(node, x)
    dims, keep = _reduced(node)
    if not (isinstance(p, Shard) and p.dim in dims):
        return None
    count = 1
    for d in dims:
        count *= shape(x)[d]
    dtype = node.kwargs.get("dtype")
    return LocalCall(partial_mean, (x, dims, keep, count, dtype), {})


@register(
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten._log_softmax.default,
    aten.cumsum.default,
    aten.cumprod.default,
    aten.sort.default,
    aten.topk.default,
)
def along_dim(node: Node, ctx: RuleContext) -> Sharding:
    """Ops that need one whole dimension and keep the others' layout."""
    x = node.args[0]
    nd = ndim(x)
    d = arg(node, 2 if node.target == aten.topk.default else 1, "dim", -1)
    d = norm_dim(d, nd)
    return _keep_unless(node, ctx, x, {d})


@register(aten.layer_norm.default, aten.rms_norm.default)
def norm(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    nd = ndim(x)
    k = len(node.args[1])
    s = _keep_unless(node, ctx, x, set(range(nd - k, nd)))
    for n in tensor_args(node):  # weight and bias: whole
        if n is not x:
            s.inputs[n] = REPLICATE
    return s


@register(aten.tril.default, aten.triu.default)
def triangle(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    nd = ndim(x)
    return _keep_unless(node, ctx, x, {nd - 2, nd - 1})


def _keep_unless(node: Node, ctx: RuleContext, x: Node, needs_whole: set[int]) -> Sharding:
    p = ctx.placement(x)
    others = {n: REPLICATE for n in tensor_args(node) if n is not x}
    if isinstance(p, Shard) and p.dim not in needs_whole:
        return Sharding(output_like(node, p), {x: p, **others})
    name = op_name(node)
    reason = f"{name} needs the whole sharded dim" if isinstance(p, Shard) else None
    return Sharding(output_like(node, REPLICATE), {x: REPLICATE, **others}, fallback=reason)

