"""Elementwise ops: the output follows a sharded input, the other inputs are brought to match.

Broadcasting is aligned from the right as torch does: an input that has size 1 (or no dim) where
the output is sharded is consumed replicated; one of full size is consumed with the same layout
(a local slice when it is replicated). Partial sums pass through ops that are linear in them
(``a + b`` of two partials, ``p * scale``, casts) and are reduced before anything else.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..placement import PARTIAL, REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, ndim, shape, static, tensor_args
from .registry import register

aten = torch.ops.aten

# ops elementwise in their tensor inputs that carry no pointwise tag
EXTRA_ELEMENTWISE = (
    aten.masked_fill.Tensor,
    aten.dropout.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.lift_fresh_copy.default,
    aten.__and__.Tensor,
    aten.__or__.Tensor,
    aten.__xor__.Tensor,
    aten.polar.default,
    aten.complex.default,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.floor_divide.default,
)

# ops linear in every tensor input when all of them are partial sums
_SUM_LINEAR = {aten.add.Tensor, aten.sub.Tensor}
# ops linear in their first tensor input when the others are replicated
_FIRST_LINEAR = {aten.mul.Tensor, aten.div.Tensor}
# ops linear in their single tensor input
_UNARY_LINEAR = {
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.neg.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
}


def _keeps_partial(node: Node, ins: list[Node], ctx: RuleContext) -> bool:
    # every occurrence counts: y * y of a partial y is not linear in y
    operands = [a for a in node.args if isinstance(a, Node)]
    partial = [a for a in operands if ctx.placement(a) is PARTIAL]
    scalars = [a for a in node.args[1:2] if not isinstance(a, Node)]
    if node.target in _SUM_LINEAR:
        # a whole addend joins the sum as one rank's part (``to_partial``, as a row-parallel bias)
        return bool(partial) and not scalars and all(ctx.placement(a) in (PARTIAL, REPLICATE) for a in operands)
    if node.target in _FIRST_LINEAR:
        return len(partial) == 1 and (node.target != aten.div.Tensor or operands[0] is partial[0])
    if node.target in _UNARY_LINEAR:
        return len(operands) == 1 and _is_float(node)
    return False


def _is_float(node: Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


@register(*EXTRA_ELEMENTWISE)
def pointwise(node: Node, ctx: RuleContext) -> Sharding:
    ins = tensor_args(node)
    # a partial sum met by a split value is reduced, not the split gathered to join the sum
    split = any(isinstance(ctx.placement(n), Shard) for n in ins)
    if not split and any(ctx.placement(n) is PARTIAL for n in ins) and _keeps_partial(node, ins, ctx):
        summed = node.target in _SUM_LINEAR
        return Sharding(PARTIAL, {n: (PARTIAL if ctx.placement(n) is PARTIAL or summed else REPLICATE) for n in ins})
    out_shape = shape(node)
    nd = len(out_shape)
    candidates = ins[:1] if torch.Tag.inplace in getattr(node.target, "tags", ()) else ins
    leader = None
    for n in candidates:
        p = ctx.placement(n)
        if isinstance(p, Shard):
            d_out = p.dim + nd - ndim(n)
            if d_out >= 0 and static(out_shape[d_out]) == p.size:
                leader = p.with_dim(d_out)
                break
    if leader is None:
        return Sharding(REPLICATE, {n: REPLICATE for n in ins})
    inputs = {}
    for n in ins:
        d_in = leader.dim - (nd - ndim(n))
        # size 1 where the output is split: broadcast, read whole (unless the output's dim is of
        # size 1 too, held whole on every rank: then the input is that same layout)
        if d_in < 0 or (static(shape(n)[d_in]) == 1 and leader.size != 1):
            inputs[n] = REPLICATE
        else:
            inputs[n] = leader.with_dim(d_in)
    return Sharding(leader, inputs)


@register(aten.type_as.default)
def type_as(node: Node, ctx: RuleContext) -> Sharding:
    """``a.type_as(b)`` takes only the dtype of ``b``: ``b`` is not moved."""
    a, b = node.args[0], node.args[1]
    pa = ctx.placement(a)
    pb = ctx.placement(b)
    out = REPLICATE if pa is FREE else pa
    return Sharding(out, {a: out, b: REPLICATE if pb is FREE else pb})


@register(
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
)
def like(node: Node, ctx: RuleContext) -> Sharding:
    """New tensors shaped like the input take its layout but not its values."""
    x = node.args[0]
    p = ctx.placement(x)
    out = p if isinstance(p, Shard) else REPLICATE
    return Sharding(out, {x: REPLICATE if p is FREE else p})


@register(aten._assert_tensor_metadata.default)
def assert_metadata(node: Node, ctx: RuleContext) -> Sharding:
    """Checks dtype/device/layout only, so any placement will do."""
    x = node.args[0]
    p = ctx.placement(x)
    return Sharding(None, {x: REPLICATE if p is FREE else p})


def invert(node: Node, wanted) -> dict | None:
    """Placements the inputs need so that the output is ``wanted`` (for layout requests)."""
    ins = tensor_args(node)
    if node.target == aten.type_as.default or node.target in (aten._assert_tensor_metadata.default,):
        ins = ins[:1]
    nd = len(shape(node))
    if not isinstance(wanted, Shard):
        return {n: wanted for n in ins}
    out = {}
    for n in ins:
        d_in = wanted.dim - (nd - ndim(n))
        if d_in < 0 or static(shape(n)[d_in]) == 1:
            out[n] = REPLICATE
        else:
            out[n] = wanted.with_dim(d_in)
    return out


@register(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
          aten.new_empty_strided.default)
def new_tensor(node: Node, ctx: RuleContext) -> Sharding:
    """``x.new_zeros(size)`` takes only the dtype and device of ``x``, whose layout stays as it is;
    the new tensor has the size it is given, whole on every rank."""
    x = node.args[0]
    p = ctx.placement(x)
    return Sharding(REPLICATE, {x: REPLICATE if p is FREE or p is None else p})
