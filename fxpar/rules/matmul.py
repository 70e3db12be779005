"""Matrix products.

A product with a *weight* (a parameter, possibly transposed or cast on the way) is where tensor
parallelism is decided:

* input replicated -> **column-parallel**: the weight is split along its output features and the
  output comes out sharded on its last dim (no communication);
* input sharded on the contracted dim -> **row-parallel**: the weight is split along its input
  features with the same layout and the output is a partial sum (one all-reduce later);
* input sharded on another dim (batch/sequence) -> the weight stays whole.

Which of these happens is not looked up by name: it follows from the placement that reaches the
input, i.e. from the data flow. The planner may still turn a column split back into a replicated
weight when its output cannot stay sharded downstream (``fxpar_decision`` says why), and users may
force a choice by module name. Products of two activations (``q @ k^T``) follow the usual batched
matmul algebra.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..placement import PARTIAL, REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, ndim, shape, static
from .registry import register

aten = torch.ops.aten


# the decision of a matmul whose column split was turned back: replicated, or row-parallel when
# its input arrives split along the contracted dim
NO_COLUMN = "no-column"


def weighted(node: Node, ctx: RuleContext, x: Node, w: Node, bias: Node | None, w_in: int, w_out: int,
             x_in: int | None = None) -> Sharding:
    """``x @ W`` contracting ``x``'s dim ``x_in`` (default: the last) with ``W``'s dim ``w_in``;
    ``w_out`` is the output features, which take the place of ``x_in`` in the output (``W @ x``,
    the weight on the left, contracts ``x``'s second-to-last dim)."""
    px, pw = ctx.placement(x), ctx.placement(w)
    decision = ctx.decision(node)
    nd = ndim(node)
    x_in = ndim(x) - 1 if x_in is None else x_in
    features = x_in + nd - ndim(x)  # the output dim of the output features

    def result(out, px_req, pw_req, pb_req):
        inputs = {x: px_req, w: pw_req}
        if isinstance(bias, Node):
            # the bias broadcasts from the right: its last dim is the output features
            inputs[bias] = pb_req.with_dim(ndim(bias) - 1) if isinstance(pb_req, Shard) else pb_req
        return Sharding(out, inputs)

    if decision == "replicate":
        return result(REPLICATE, REPLICATE, REPLICATE, REPLICATE)
    if isinstance(px, Shard) and px.dim == x_in and px.is_partition:
        wl = px.with_dim(w_in)
        if pw is FREE or wl == pw:
            # the bias is added once: on one rank, as its part of the partial sum
            return result(PARTIAL, px, wl, PARTIAL)
    if isinstance(px, Shard) and px.dim != x_in and pw in (FREE, REPLICATE):
        out = px.with_dim(px.dim + nd - ndim(x))
        return result(out, px, REPLICATE, REPLICATE)
    if decision == NO_COLUMN:  # a column split was turned back: whole, whatever the weight's other uses
        return result(REPLICATE, REPLICATE, REPLICATE, REPLICATE)
    # the input is (made) replicated from here on
    out_features = static(shape(w)[w_out])
    if isinstance(pw, Shard) and pw.dim == w_out:
        return result(pw.with_dim(features), REPLICATE, pw, pw)
    if isinstance(pw, Shard) and pw.dim == w_in:
        return result(PARTIAL, pw.with_dim(x_in), pw, PARTIAL)
    if pw is FREE and decision == "rowwise":
        in_features = static(shape(w)[w_in])
        if in_features and in_features % ctx.world == 0:
            layout = Shard.even(w_in, in_features, ctx.world)
            return result(PARTIAL, layout.with_dim(x_in), layout, PARTIAL)
    if pw is FREE and decision in ("auto", "colwise") and out_features:
        layout = ctx.seed_layout(node)
        if layout is None and out_features % ctx.world == 0:
            layout = Shard.even(w_out, out_features, ctx.world)
        if layout is not None:
            layout = layout.with_dim(w_out)
            return result(layout.with_dim(features), REPLICATE, layout, layout)
    return result(REPLICATE, REPLICATE, REPLICATE, REPLICATE)


def activation_matmul(node: Node, ctx: RuleContext, a: Node, b: Node) -> Sharding:
    """Batched ``a @ b`` of two activations, shapes ``(..., n, k) @ (..., k, m)``."""
    pa, pb = ctx.placement(a), ctx.placement(b)
    pa = REPLICATE if pa is FREE else pa
    pb = REPLICATE if pb is FREE else pb
    na, nb, nd = ndim(a), ndim(b), ndim(node)
    if na < 2 or nb < 2:
        return _all_replicated(node, a, b, pa, pb)
    # a product is linear in a partial sum, but one met by a split operand is reduced instead
    # of the split gathered to keep the sum
    if pa is PARTIAL and pb is not PARTIAL and not isinstance(pb, Shard):
        return Sharding(PARTIAL, {a: PARTIAL, b: REPLICATE})
    if pb is PARTIAL and pa is not PARTIAL and not isinstance(pa, Shard):
        return Sharding(PARTIAL, {a: REPLICATE, b: PARTIAL})
    for p, this, other, n_this, n_other, is_a in ((pa, a, b, na, nb, True), (pb, b, a, nb, na, False)):
        if not isinstance(p, Shard):
            continue
        if p.dim < n_this - 2:  # batch dim
            d_out = p.dim + nd - n_this
            d_other = d_out - (nd - n_other)
            if d_other < 0 or d_other >= n_other - 2 or static(shape(other)[d_other]) == 1:
                req_other = REPLICATE
            else:
                req_other = p.with_dim(d_other)
            return Sharding(p.with_dim(d_out), {this: p, other: req_other})
        if is_a and p.dim == na - 2:
            return Sharding(p.with_dim(nd - 2), {a: p, b: REPLICATE})
        if not is_a and p.dim == nb - 1:
            return Sharding(p.with_dim(nd - 1), {a: REPLICATE, b: p})
        # contracted dim: the other operand must be split the same way, each element once
        if not p.is_partition:
            break
        other_dim = nb - 2 if is_a else na - 1
        return Sharding(PARTIAL, {this: p, other: p.with_dim(other_dim)})
    return Sharding(REPLICATE, {a: REPLICATE, b: REPLICATE})


def _all_replicated(node, a, b, pa, pb):
    sharded = isinstance(pa, Shard) or isinstance(pb, Shard)
    return Sharding(REPLICATE, {a: REPLICATE, b: REPLICATE}, fallback="matmul of a 1-d sharded operand" if sharded else None)


@register(aten.linear.default)
def linear(node: Node, ctx: RuleContext) -> Sharding:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if ctx.is_weight(w):
        return weighted(node, ctx, x, w, bias, w_in=1, w_out=0)
    return Sharding(REPLICATE, {n: REPLICATE for n in (x, w, bias) if isinstance(n, Node)}, fallback="linear with an activation as weight")


@register(aten.addmm.default)
def addmm(node: Node, ctx: RuleContext) -> Sharding:
    bias, x, w = node.args[0], node.args[1], node.args[2]
    if ctx.is_weight(w) and len(node.args) <= 3 and not node.kwargs:
        return weighted(node, ctx, x, w, bias, w_in=0, w_out=1)
    return Sharding(REPLICATE, {n: REPLICATE for n in (bias, x, w)}, fallback="addmm of activations")


@register(aten.mm.default, aten.matmul.default, aten.bmm.default)
def matmul(node: Node, ctx: RuleContext) -> Sharding:
    a, b = node.args[0], node.args[1]
    if ndim(b) == 2 and ctx.is_weight(b) and not ctx.is_weight(a):
        return weighted(node, ctx, a, b, None, w_in=0, w_out=1)
    if _weight_left(a, b, ctx.is_weight):
        # ``W @ x``: the output features are the output's second-to-last dim
        return weighted(node, ctx, b, a, None, w_in=1, w_out=0, x_in=ndim(b) - 2)
    return activation_matmul(node, ctx, a, b)


def feature_dim(node: Node) -> int:
    """The dim of a weighted matmul's output that holds its output features."""
    from . import is_weight  # the rules package imports this module

    a, b = node.args[0], node.args[1]
    weight_left = node.target in (aten.mm.default, aten.matmul.default) and _weight_left(a, b, is_weight)
    return ndim(node) - (2 if weight_left else 1)


def _weight_left(a, b, is_weight) -> bool:
    """``a @ b`` with a 2-d weight ``a`` and an activation ``b``."""
    return (isinstance(a, Node) and isinstance(b, Node) and ndim(a) == 2 and ndim(b) >= 2
            and is_weight(a) and not is_weight(b))


@register(aten.baddbmm.default)
def baddbmm(node: Node, ctx: RuleContext) -> Sharding:
    """``beta * input + alpha * (batch1 @ batch2)`` (attention scores with an ALiBi bias): the
    product's rule, and ``input`` brought to the product's layout (added once to a partial sum)."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    mm = activation_matmul(node, ctx, a, b)
    out = mm.output
    if out is PARTIAL:
        want = PARTIAL
    elif isinstance(out, Shard):
        d = out.dim - (ndim(node) - ndim(bias))
        want = REPLICATE if d < 0 or static(shape(bias)[d]) == 1 else out.with_dim(d)
    else:
        want = REPLICATE
    pb = ctx.placement(bias)
    if pb is PARTIAL and want is not PARTIAL:
        want = REPLICATE
    return Sharding(out, {**mm.inputs, bias: want})


def grouped(node: Node, ctx: RuleContext) -> Sharding:
    """``grouped_mm(x, W, offs)``: the rows of ``x`` (tokens sorted by expert) times their
    expert's slice of ``W`` (experts, in, out); a weighted matmul for every expert at once, split
    by output or input features inside each expert like any other."""
    x, w = node.args[0], node.args[1]
    if ctx.is_weight(w) and ndim(w) == 3 and ndim(x) == 2:
        return weighted(node, ctx, x, w, None, w_in=1, w_out=2)
    return Sharding(REPLICATE, {n: REPLICATE for n in node.args[:3] if isinstance(n, Node)}, fallback="grouped_mm of activations")


register(aten._grouped_mm.default)(grouped)
# Hugging Face's CPU fallback of grouped_mm, registered when transformers is imported
NAMED_RULES = {"transformers::grouped_mm_fallback": grouped}

# ops the planner treats as decisions (seeds of sharded regions) and may revert to replicate
DECIDABLE = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten._grouped_mm.default}


def grouped_ops() -> frozenset:
    """``aten._grouped_mm`` and the grouped matmuls of libraries imported by now."""
    ops = {aten._grouped_mm.default}
    for name in NAMED_RULES:
        ns, op = name.split("::")
        try:
            ops.add(getattr(getattr(torch.ops, ns), op).default)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(ops)


def decidable_ops() -> frozenset:
    """``DECIDABLE`` and the grouped matmuls of libraries imported by now."""
    return frozenset(DECIDABLE) | grouped_ops()


@register(aten.einsum.default)
def einsum(node: Node, ctx: RuleContext) -> Sharding:
    """``einsum(equation, operands)``: a split index letter stays split where it survives into the
    output, and makes a partial sum where it is summed over (each element held once); operands
    without that letter are read whole. A partial operand with whole others stays partial."""
    equation, ops = node.args[0], list(node.args[1])
    tensors = [o for o in ops if isinstance(o, Node)]
    whole = Sharding(REPLICATE, {o: REPLICATE for o in tensors})
    if "..." in equation or "->" not in equation or len(tensors) != len(ops):
        return Sharding(REPLICATE, {o: REPLICATE for o in tensors},
                        fallback="einsum with an ellipsis" if any(isinstance(ctx.placement(o), Shard) for o in tensors) else None)
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    places = [ctx.placement(o) for o in ops]
    places = [REPLICATE if p is FREE else p for p in places]
    partial = [i for i, p in enumerate(places) if p is PARTIAL]
    if partial:
        if len(partial) == 1 and all(p is REPLICATE for i, p in enumerate(places) if i not in partial):
            return Sharding(PARTIAL, {o: places[i] for i, o in enumerate(ops)})
        return whole
    lead = next(((i, p) for i, p in enumerate(places) if isinstance(p, Shard)), None)
    if lead is None:
        return whole
    i, p = lead
    letter = subs[i][p.dim]
    if any(s.count(letter) > 1 for s in subs) or out.count(letter) > 1:
        return Sharding(REPLICATE, {o: REPLICATE for o in tensors}, fallback="einsum repeating a split index")
    inputs = {}
    for o, s in zip(ops, subs):
        d = s.find(letter)
        inputs[o] = p.with_dim(d) if d >= 0 and static(shape(o)[d]) == p.size else REPLICATE
    if letter in out:
        return Sharding(p.with_dim(out.index(letter)), inputs)
    if not p.is_partition or any(isinstance(q, Shard) and q.dim == s.find(letter) and q != p.with_dim(q.dim)
                                 for q, s in zip(places, subs)):
        return Sharding(REPLICATE, {o: REPLICATE for o in tensors}, fallback="einsum summing a split index held twice")
    return Sharding(PARTIAL, inputs)
