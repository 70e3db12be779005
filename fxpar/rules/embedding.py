"""Embedding lookups.

A table indexed by the user's token ids and at least as tall as it is wide (a vocabulary) is split
along its rows: each rank looks up the ids it owns, writes zeros for the others, and the partial
results are summed by one all-reduce (Megatron's vocab-parallel embedding). A table indexed by
computed positions (``arange``) is split the same way when its lookups are added to such a
partial sum (they join its all-reduce); otherwise it stays replicated, as do small categorical
tables: an all-reduce of their own would cost more than the memory saved. A table tied to a column-parallel output projection follows the
projection's split.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from ..ops.local import vocab_parallel_embedding
from .base import FREE, RuleContext, Sharding, arg, ndim, shape, static
from .registry import localizer, register

aten = torch.ops.aten


@register(aten.embedding.default)
def embedding(node: Node, ctx: RuleContext) -> Sharding:
    w, idx = node.args[0], node.args[1]
    pw = ctx.placement(w)
    decision = ctx.decision(node)
    rows, width = static(shape(w)[0]), static(shape(w)[1])
    if decision == "replicate" or arg(node, 3, "scale_grad_by_freq", False) or arg(node, 4, "sparse", False):
        # frequency scaling counts ids over the whole table; sparse gradients stay whole too
        return Sharding(REPLICATE, {w: REPLICATE, idx: REPLICATE})
    if pw is FREE:
        vocab_like = ctx.user_input_dependent(idx) and rows and width and rows >= width
        if decision == "vocab" or (decision == "auto" and (vocab_like or _joins_a_partial_sum(node, ctx))):
            if rows % ctx.world == 0:
                pw = Shard.even(0, rows, ctx.world)
        elif decision == "colwise" and width % ctx.world == 0:
            pw = Shard.even(1, width, ctx.world)
    if isinstance(pw, Shard) and pw.dim == 0 and pw.is_even:
        return Sharding(PARTIAL, {w: pw, idx: REPLICATE})
    if isinstance(pw, Shard) and pw.dim == 1:
        return Sharding(pw.with_dim(ndim(node) - 1), {w: pw, idx: REPLICATE})
    pi = ctx.placement(idx)
    if pw is REPLICATE and isinstance(pi, Shard):
        # a whole table looks up each rank's own ids (the sequence split of context parallelism)
        return Sharding(pi, {w: REPLICATE, idx: pi})
    return Sharding(REPLICATE, {w: REPLICATE, idx: REPLICATE})


def _joins_a_partial_sum(node: Node, ctx: RuleContext) -> bool:
    """The lookup is added to a partial sum made before it (learned positions added to the
    vocab-parallel token embeddings): split by rows too, it joins the same all-reduce."""
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.target in _CARRY and user.args[0] is n:  # ``position_embeds.to(device)``
                frontier.append(user)
            elif user.target in (aten.add.Tensor, aten.sub.Tensor):
                others = [a for a in user.args[:2] if isinstance(a, Node) and a is not n]
                if others and all(ctx.placement(o) is PARTIAL for o in others):
                    return True
    return False


_CARRY = (aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default,
          aten.clone.default, aten.contiguous.default)


@localizer(aten.embedding.default)
def local_embedding(node: Node, rank: int, lctx):
    w, idx = node.args[0], node.args[1]
    pw = lctx.inp(node, w)
    if not (isinstance(pw, Shard) and pw.dim == 0):
        return None
    (start, stop), = pw.runs[rank]
    padding_idx = arg(node, 2, "padding_idx", -1)
    return LocalCall(vocab_parallel_embedding, (w, idx, start, stop, padding_idx), {})
