"""Embedding lookups.

A table indexed by the user's token ids and at least as tall as it is wide (a vocabulary) is split
along its rows: each rank looks up the ids it owns, writes zeros for the others, and the partial
results are summed by one all-reduce (Megatron's vocab-parallel embedding). Tables indexed by
computed positions (``arange``) or small categorical tables stay replicated: the all-reduce would
cost more than the memory saved. A table tied to a column-parallel output projection follows the
projection's split.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..metadata import LocalCall
from ..placement import PARTIAL, REPLICATE, Shard
from ..runtime.ops import vocab_parallel_embedding
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
        if decision == "vocab" or (decision == "auto" and vocab_like):
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


@localizer(aten.embedding.default)
def local_embedding(node: Node, rank: int, lctx):
    w, idx = node.args[0], node.args[1]
    pw = lctx.inp(node, w)
    if not (isinstance(pw, Shard) and pw.dim == 0):
        return None
    (start, stop), = pw.runs[rank]
    padding_idx = arg(node, 2, "padding_idx", -1)
    return LocalCall(vocab_parallel_embedding, (w, idx, start, stop, padding_idx), {})
