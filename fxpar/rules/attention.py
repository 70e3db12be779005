"""Scaled-dot-product attention, split by heads.

Heads are independent, so attention runs locally when q, k and v are split along the same head
dim: each rank attends with its own heads. With grouped-query attention (``enable_gqa``, fewer
key/value heads than query heads) each rank needs the key/value heads its query heads read; when
there are fewer key/value heads than ranks, several ranks hold the same one (a layout with
duplicates; the slice that makes it sums its gradient over those ranks).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..ops.ring import ring_attention
from ..placement import REPLICATE, Shard
from .base import FREE, RuleContext, Sharding, arg, ndim, shape, static
from .registry import register

aten = torch.ops.aten


def gqa_layout(q: Shard, n_kv: int) -> Shard | None:
    """Key/value head layout for query heads placed as ``q`` with ``n_kv`` key/value heads."""
    group = q.size // n_kv
    owned = []
    for r in range(q.world):
        qh = q.indices(r)
        kv = np.unique(qh // group)
        if qh.size % kv.size:
            return None
        per = qh.size // kv.size
        if not np.array_equal(qh // group, np.repeat(kv, per)):
            return None
        owned.append(kv)
    try:
        return Shard.from_indices(q.dim, n_kv, owned)
    except ValueError:
        return None


@register(aten.scaled_dot_product_attention.default)
def sdpa(node: Node, ctx: RuleContext) -> Sharding:
    return _by_heads(node, ctx, arg(node, 3, "attn_mask"))


@register(ring_attention)
def ring(node: Node, ctx: RuleContext) -> Sharding:
    """Ring attention (context parallelism) splits by heads over tp as attention does."""
    return _by_heads(node, ctx, arg(node, 6, "attn_mask"))


def _by_heads(node: Node, ctx: RuleContext, mask) -> Sharding:
    q, k, v = node.args[0], node.args[1], node.args[2]
    tensors = [n for n in (q, k, v, mask) if isinstance(n, Node)]
    nd = ndim(q)
    places = {n: ctx.placement(n) for n in tensors}

    def replicated(reason=None):
        return Sharding(REPLICATE, {t: REPLICATE for t in tensors}, fallback=reason)

    head = None
    for n in (q, k, v):
        p = places[n]
        if isinstance(p, Shard) and p.dim < nd - 2:
            head = (n, p)
            break
    if head is None:
        return replicated()
    n, p = head
    hq, hk = static(shape(q)[p.dim]), static(shape(k)[p.dim])
    if n is not q and hq != hk:
        return replicated("key/value heads sharded without query heads")
    lq = p
    lk = lq if hk == hq else (gqa_layout(lq, hk) if hk and hq % hk == 0 else None)
    if lk is None:
        return replicated("query heads do not map onto key/value heads")
    inputs = {q: lq, k: lk, v: lk}
    if isinstance(mask, Node):
        dm = lq.dim - (nd - ndim(mask))
        inputs[mask] = REPLICATE if dm < 0 or static(shape(mask)[dm]) == 1 else lq.with_dim(dm)
    for t in tensors:
        if places[t] is FREE and not isinstance(inputs[t], Shard):
            inputs[t] = REPLICATE
    return Sharding(lq.with_dim(p.dim), inputs)
