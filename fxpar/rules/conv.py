"""Convolutions whose channels are independent (``groups`` equal to the channels: a depthwise
convolution, the short causal convolution of a state-space mixer): split by channel like the
projection that feeds them, weight and bias split the same way, no communication."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from .base import RuleContext, Sharding, arg, replicated, shape, static
from .registry import localizer, register

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def _depthwise(node: Node) -> bool:
    x, w = node.args[0], node.args[1]
    channels = static(shape(x)[1]) if len(shape(x)) > 1 else None
    groups = arg(node, 6, "groups", 1)
    return channels is not None and groups == channels == static(shape(w)[0]) and static(shape(w)[1]) == 1


@register(*CONVS)
def conv(node: Node, ctx: RuleContext) -> Sharding:
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    p = ctx.placement(x)
    if p is PARTIAL and not isinstance(bias, Node):  # a convolution is linear in its input
        return Sharding(PARTIAL, {x: PARTIAL, w: REPLICATE})
    if not (isinstance(p, Shard) and p.dim == 1 and _depthwise(node)):
        why = "convolution over a sharded dim that mixes channels" if isinstance(p, Shard) else None
        return replicated(node, ctx, reason=why)
    inputs = {x: p, w: p.with_dim(0)}
    if isinstance(bias, Node):
        inputs[bias] = p.with_dim(0)
    return Sharding(p, inputs)


@localizer(*CONVS)
def local_conv(node: Node, rank: int, lctx):
    out = lctx.out(node)
    if not isinstance(out, Shard) or out.dim != 1:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    defaults = [None, None, None, 1, 0, 1, 1]
    for i in range(len(node.args), 7):
        args[i] = node.kwargs.get(("input", "weight", "bias", "stride", "padding", "dilation", "groups")[i], defaults[i])
    args[6] = out.local_size
    return LocalCall(node.target, tuple(args), {})


def invert_conv(node: Node, wanted):
    """The input layout that makes a depthwise convolution come out as ``wanted``: the same
    channels (a request from the pieces the output is cut into reaches the projection before)."""
    if not (isinstance(wanted, Shard) and wanted.dim == 1 and _depthwise(node)):
        return None
    return {node.args[0]: wanted}
