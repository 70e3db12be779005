"""Views and dimension shuffles: reshape/view/flatten/unflatten (by enumeration, see
``layout_algebra``), expand, permute/transpose, unsqueeze/squeeze and complex views.

Every op here also has an ``invert`` so that a layout needed downstream (a split that wants the
fused q/k/v output in three segments) can be carried back to the weight that produces it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..layout_algebra import group_layout, view_groups, view_shard, view_superset, whole_everywhere
from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, arg, ndim, norm_dim, op_name, shape, static
from .registry import localizer, register
from .slicing import cut_layout, cuts_of

aten = torch.ops.aten

RESHAPES = (
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
)


def _unary(node: Node, ctx: RuleContext, forward, why=None) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    if p is PARTIAL:
        return Sharding(PARTIAL, {x: PARTIAL})
    if isinstance(p, Shard):
        q = forward(p)
        if q is not None:
            return Sharding(q, {x: p})
        reason = (why(p) if why else None) or f"{op_name(node)} regroups the sharded dim {p.dim}"
        return Sharding(REPLICATE, {x: REPLICATE}, fallback=reason)
    return Sharding(REPLICATE, {x: REPLICATE})


@register(*RESHAPES)
def reshape(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    p = ctx.placement(x)
    if isinstance(p, Shard) and view_shard(shape(x), shape(node), p) is None:
        regrouped = regroup(node, p)
        if regrouped is not None:
            out, wanted = regrouped
            return Sharding(out, {x: wanted})
    return _unary(node, ctx, lambda p: view_shard(shape(x), shape(node), p), lambda p: _indivisible(node, p))


def regroup(node: Node, p: Shard):
    """``(output layout, input layout)`` for a view that cuts a split dim into groups the split
    does not follow (``(B, T, 3*H*D) -> (B, T, 3, H, D)`` after an even split, ``(B, T, 2*D) ->
    (B, T, 2, D)`` with two key/value heads over four ranks): the output split by its outermost
    group dim that divides over the ranks (``H``, not the ``3`` of q/k/v), else shared by
    groups of ranks as grouped-query attention shares a head, else split along the innermost dim
    (``(B, T, 3*E) -> (B, T, 3, E)`` of ``nn.MultiheadAttention``, whose ``E`` holds the heads),
    and the input layout that view needs, for the planner to ask of the producer. None if no dim
    fits."""
    x = node.args[0]
    for gi, gj in view_groups(shape(x), shape(node)):
        if p.dim not in gi or not gj or len(gj) < 2:
            continue
        dims = [d for d in gj if isinstance(static(shape(node)[d]), int) and static(shape(node)[d]) > 1]
        outer, inner = dims[:-1], dims[-1:]
        tries = [(d, "even") for d in outer] + [(d, "share") for d in outer] + [(d, "cuts") for d in outer]
        # the innermost dim only where a later view cuts a dim of its size again (the E of
        # ``(3, E)`` becomes heads x head_dim), never a head's own features
        inner = [d for d in inner if _cut_again_later(node, static(shape(node)[d]))]
        for d, how in tries + [(d, "even") for d in inner]:
            n = static(shape(node)[d])
            if how == "cuts":  # the dim is cut into pieces later (query heads | key | value)
                pieces = cuts_of(node, d)
                out = cut_layout(d, n, p.world, [x for piece in pieces for x in piece]) if pieces else None
                out = None if out is None or out.is_whole else out
            elif (how == "even") != (n % p.world == 0):
                continue
            else:
                out = group_layout(d, n, p.world)
            wanted = None if out is None else view_shard(shape(node), shape(x), out)
            if wanted is not None and wanted.covers_all:
                return out, wanted
    return None


def _indivisible(node: Node, p: Shard) -> str | None:
    """Why a view cannot keep a split it cuts into groups: fewer groups than ranks, or a count
    that does not divide (heads that do not divide by tp, typically)."""
    x = node.args[0]
    for gi, gj in view_groups(shape(x), shape(node)):
        if p.dim not in gi or not gj or len(gi) != 1:
            continue
        outs = [static(shape(node)[d]) for d in gj]
        if len(outs) > 1 and isinstance(outs[0], int) and outs[0] % p.world:
            return (f"{op_name(node)} cuts the sharded dim of {static(shape(x)[p.dim])} into {tuple(outs)}, and its "
                    f"{outs[0]} groups (attention heads, say) do not divide among {p.world} ranks")
    return None


def _cut_again_later(node: Node, size: int, depth: int = 8) -> bool:
    """Whether a view within ``depth`` ops after ``node`` splits a dim of ``size`` into several."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if u.target in RESHAPES and isinstance(u.args[0], Node):
                    for gi, gj in view_groups(shape(u.args[0]), shape(u)):
                        sizes = [static(shape(u.args[0])[i]) for i in gi]
                        if gj and len([j for j in gj if static(shape(u)[j]) != 1]) > 1 and size in sizes:
                            return True
                nxt.append(u)
        frontier = nxt
    return False


def invert_reshape(node: Node, wanted):
    x = node.args[0]
    if not isinstance(wanted, Shard):
        return {x: wanted}
    q = view_shard(shape(node), shape(x), wanted)
    if q is None and x.op == "call_function" and x.target == aten.expand.default:
        q = view_superset(shape(x), shape(node), wanted, _broadcast_dims(x))
    return None if q is None else {x: q}


def _broadcast_dims(node: Node) -> set[int]:
    """Dims of an ``expand``'s output that are copies (size 1, or absent, in its input)."""
    x = node.args[0]
    offset = ndim(node) - ndim(x)
    return {d for d in range(ndim(node)) if d < offset or (static(shape(x)[d - offset]) == 1 != static(shape(node)[d]))}


def _view_local(node: Node, rank: int, lctx, size_index: int, name: str):
    out = lctx.out(node)
    if not isinstance(out, Shard):
        return None
    sizes = list(arg(node, size_index, name))
    sizes[out.dim] = out.local_size
    args = list(node.args)
    if len(args) > size_index:
        args[size_index] = sizes
        return LocalCall(node.target, tuple(args), dict(node.kwargs))
    return LocalCall(node.target, tuple(args), dict(node.kwargs, **{name: sizes}))


@localizer(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def local_view(node: Node, rank: int, lctx):
    return _view_local(node, rank, lctx, 1, "size" if node.target != aten.reshape.default else "shape")


@localizer(aten.expand.default)
def local_expand(node: Node, rank: int, lctx):
    return _view_local(node, rank, lctx, 1, "size")


@localizer(aten.unflatten.int)
def local_unflatten(node: Node, rank: int, lctx):
    out = lctx.out(node)
    if not isinstance(out, Shard):
        return None
    dim = norm_dim(node.args[1], ndim(node.args[0]))
    sizes = list(node.args[2])
    if not dim <= out.dim < dim + len(sizes):
        return None
    sizes[out.dim - dim] = out.local_size
    return LocalCall(node.target, (node.args[0], node.args[1], sizes), dict(node.kwargs))


@register(aten.expand.default)
def expand(node: Node, ctx: RuleContext) -> Sharding:
    x = node.args[0]
    offset = ndim(node) - ndim(x)

    def fwd(p: Shard):
        return p.with_dim(p.dim + offset) if static(shape(node)[p.dim + offset]) == p.size else None

    return _unary(node, ctx, fwd)


def invert_expand(node: Node, wanted):
    x = node.args[0]
    if not isinstance(wanted, Shard):
        return {x: wanted}
    d = wanted.dim - (ndim(node) - ndim(x))
    if d >= 0 and static(shape(x)[d]) == 1 != wanted.size:
        # copies of one element, split over the ranks: every rank reads the element; "whole on
        # every rank" as a split (not replicated) lets the request go on to a split producer
        return {x: whole_everywhere(d, 1, wanted.world)}
    if d < 0 or static(shape(x)[d]) != wanted.size:
        return {x: REPLICATE} if d < 0 else None
    return {x: wanted.with_dim(d)}


# every way of writing a transpose (``W.T`` exports as numpy_T, ``W.mT`` as mT, ...)
PERMUTES = (aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.mT.default,
            aten.mH.default, aten.adjoint.default, aten.swapaxes.default, aten.swapdims.default, aten.movedim.int)


def _perm(node: Node) -> list[int]:
    """``perm`` such that output dim ``i`` is input dim ``perm[i]``."""
    nd = ndim(node)
    t = node.target
    if t == aten.permute.default:
        return [norm_dim(d, nd) for d in node.args[1]]
    if t == aten.t.default:
        return [1, 0] if nd == 2 else [0]
    if t == aten.numpy_T.default:
        return list(reversed(range(nd)))
    if t in (aten.mT.default, aten.mH.default, aten.adjoint.default):
        return list(range(nd - 2)) + [nd - 1, nd - 2]
    if t == aten.movedim.int:
        src, dst = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        order = [d for d in range(nd) if d != src]
        order.insert(dst, src)
        return order
    a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


@register(*PERMUTES)
def permute(node: Node, ctx: RuleContext) -> Sharding:
    perm = _perm(node)
    return _unary(node, ctx, lambda p: p.with_dim(perm.index(p.dim)))


def invert_permute(node: Node, wanted):
    x = node.args[0]
    if not isinstance(wanted, Shard):
        return {x: wanted}
    return {x: wanted.with_dim(_perm(node)[wanted.dim])}


def _squeeze_map(node: Node) -> list[int | None]:
    """For each input dim, the output dim it becomes (None when removed)."""
    x = node.args[0]
    nd_in, nd_out = ndim(x), ndim(node)
    t = node.target
    if t == aten.unsqueeze.default:
        d = norm_dim(node.args[1], nd_out)
        return [i if i < d else i + 1 for i in range(nd_in)]
    if t == aten.squeeze.default:
        dims = [i for i in range(nd_in) if static(shape(x)[i]) == 1]
    elif t == aten.squeeze.dim:
        dims = [norm_dim(node.args[1], nd_in)]
    else:
        dims = [norm_dim(d, nd_in) for d in node.args[1]]
    dims = [d for d in dims if static(shape(x)[d]) == 1]
    out, k = [], 0
    for i in range(nd_in):
        if i in dims:
            out.append(None)
        else:
            out.append(k)
            k += 1
    return out


@register(aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
def squeeze(node: Node, ctx: RuleContext) -> Sharding:
    m = _squeeze_map(node)
    return _unary(node, ctx, lambda p: p.with_dim(m[p.dim]) if m[p.dim] is not None else None)


def invert_squeeze(node: Node, wanted):
    x = node.args[0]
    if not isinstance(wanted, Shard):
        return {x: wanted}
    m = _squeeze_map(node)
    if wanted.dim not in m and wanted.is_whole:  # a new dim of size 1 every rank holds: all of x
        return {x: whole_everywhere(0, static(shape(x)[0]) or 1, wanted.world)}
    return {x: wanted.with_dim(m.index(wanted.dim))} if wanted.dim in m else None


@register(aten.repeat.default)
def repeat(node: Node, ctx: RuleContext) -> Sharding:
    """``x.repeat(*counts)`` tiles every dim: a split dim tiled once keeps its split."""
    x = node.args[0]
    counts = list(node.args[1])
    offset = len(counts) - ndim(x)

    def fwd(p: Shard):
        return p.with_dim(p.dim + offset) if counts[p.dim + offset] == 1 else None

    return _unary(node, ctx, fwd, lambda p: "repeat tiles the sharded dim")


@register(aten.repeat_interleave.self_int)
def repeat_interleave(node: Node, ctx: RuleContext) -> Sharding:
    """``x.repeat_interleave(k, dim)``: each element ``k`` times in a row. A split of another dim
    stays; a split of ``dim`` gives each rank the repeats of its own elements (the key/value
    groups of a state-space mixer repeated for its heads)."""
    x, k = node.args[0], node.args[1]
    dim = arg(node, 2, "dim")
    if dim is None:
        return _unary(node, ctx, lambda p: None, lambda p: "repeat_interleave of a flattened split tensor")
    dim = norm_dim(dim, ndim(x))

    def fwd(p: Shard):
        if p.dim != dim:
            return p
        return Shard.from_indices(dim, p.size * k, [np.repeat(p.indices(r) * k, k) + np.tile(np.arange(k), p.local_size)
                                                   for r in range(p.world)])

    return _unary(node, ctx, fwd)


def invert_repeat_interleave(node: Node, wanted):
    """The elements whose repeats each rank needs (all repeats of them, a superset it picks from)."""
    x, k = node.args[0], node.args[1]
    dim = arg(node, 2, "dim")
    if not isinstance(wanted, Shard):
        return {x: wanted}
    if dim is None:
        return None
    if wanted.dim != norm_dim(dim, ndim(x)):
        return {x: wanted}
    try:
        return {x: Shard.from_indices(wanted.dim, wanted.size // k, [np.unique(wanted.indices(r) // k)
                                                                     for r in range(wanted.world)])}
    except ValueError:
        return None


def _padded_dims(node: Node) -> set[int]:
    """Dims ``pad`` / ``constant_pad_nd`` pads (its list pairs dims from the last one back)."""
    pads, nd = list(node.args[1]), ndim(node.args[0])
    return {nd - 1 - i for i in range(len(pads) // 2) if pads[2 * i] != 0 or pads[2 * i + 1] != 0}


@register(aten.pad.default, aten.constant_pad_nd.default)
def pad(node: Node, ctx: RuleContext) -> Sharding:
    """Padding other dims keeps a split (a state-space scan padding the sequence to whole chunks)."""
    return _unary(node, ctx, lambda p: p if p.dim not in _padded_dims(node) else None,
                  lambda p: "padding of the sharded dim")


def invert_pad(node: Node, wanted):
    if isinstance(wanted, Shard) and wanted.dim in _padded_dims(node):
        return None
    return {node.args[0]: wanted}


@register(aten.view_as_complex.default)
def view_as_complex(node: Node, ctx: RuleContext) -> Sharding:
    """(..., n, 2) real -> (..., n) complex: any dim but the last pair dim keeps its shard."""
    x = node.args[0]
    last = ndim(x) - 1
    return _unary(node, ctx, lambda p: p if p.dim < last else None)


@register(aten.view_as_real.default)
def view_as_real(node: Node, ctx: RuleContext) -> Sharding:
    return _unary(node, ctx, lambda p: p)


@register(aten.sym_size.int)
def sym_size(node: Node, ctx: RuleContext) -> Sharding:
    """The size of a dim that is not sharded is the same on every rank; a sharded dim is static,
    so export wrote its size as a constant and never asks for it."""
    x = node.args[0]
    p = ctx.placement(x)
    if isinstance(p, Shard) and p.dim == norm_dim(node.args[1], ndim(x)):
        return Sharding(None, {x: REPLICATE}, fallback="size of the sharded dim")
    return Sharding(None, {x: REPLICATE if p is FREE else p})


def invert_select(node: Node, wanted):
    """``x.select(dim, i)`` keeps the other dims: a layout of the output is one of ``x`` (one
    expert's matrix out of a stacked weight has the layout the stack is stored in)."""
    x = node.args[0]
    if not isinstance(wanted, Shard):
        return {x: wanted}
    dim = norm_dim(node.args[1], ndim(x))
    return {x: wanted.with_dim(wanted.dim + (wanted.dim >= dim))}


def invert_identity(node: Node, wanted):
    return {node.args[0]: wanted}


INVERSES = {
    **{op: invert_reshape for op in RESHAPES},
    aten.expand.default: invert_expand,
    **{op: invert_permute for op in PERMUTES},
    aten.unsqueeze.default: invert_squeeze,
    aten.squeeze.default: invert_squeeze,
    aten.squeeze.dim: invert_squeeze,
    aten.squeeze.dims: invert_squeeze,
    aten.select.int: invert_select,
    aten.repeat_interleave.self_int: invert_repeat_interleave,
    aten.pad.default: invert_pad,
    aten.constant_pad_nd.default: invert_pad,
    aten.view_as_complex.default: invert_identity,
    aten.view_as_real.default: invert_identity,
}
