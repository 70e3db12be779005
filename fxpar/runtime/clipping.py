"""Gradient clipping over the whole model, from the shards every rank holds
(``ParallelModule.clip_grad_norm_``)."""

from __future__ import annotations

import torch

from ..geometry import ShardGeometry
from ..placement import Shard


@torch.no_grad()
def clip_grad_norm_(grads: list[tuple[str, torch.Tensor]], geometry: ShardGeometry, rank: int, comms: dict, device,
                    max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale this rank's gradients ``grads`` (``(name, gradient)`` of its parameters) so that the
    whole model's gradient norm is at most ``max_norm``; returns that norm, the same on every rank.

    Sharded gradients contribute from every tp rank, replicated ones once, a parameter held by
    several pipeline stages once (its owner's copy), each ep rank its own experts: so every rank
    gets the same norm and the same scale. A collective over every mesh dimension's communicator
    in ``comms``."""
    inf = norm_type == float("inf")
    where = geometry.mesh.coordinate(rank)
    pp, tp = where["pp"], where["tp"]

    def reduce(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float64, device=device)
        if inf:  # on the device, whatever memory a gradient is in (offloaded masters' are on the host)
            return torch.stack([g.detach().abs().max().double().to(device) for g in gs]).max()
        return torch.stack([g.detach().double().abs().pow(norm_type).sum().to(device) for g in gs]).sum()

    def tp_norm(part):  # over the tp ranks: shards add up, replicated gradients count once
        placed = [(geometry.placement(n), g, geometry.dp_rows(n, rank)) for n, g in part]
        sharded = [_counted_once(g, place, tp, rows) for place, g, rows in placed if isinstance(place, Shard)]
        sharded = _combine(comms["tp"], reduce(sharded), inf)
        whole = reduce([g for place, g, _ in placed if not isinstance(place, Shard)])
        return torch.maximum(sharded, whole) if inf else sharded + whole

    def norm_of(part):  # rows zero splits add up over the ranks it splits them over
        total = tp_norm([(n, g) for n, g in part if geometry.zero_rows(n) is None])
        for group in ("dp", "dp_ep"):
            rows = [(n, g) for n, g in part if geometry.zero_rows(n) is not None and geometry.zero_group(n) == group]
            split = _combine(comms[group], tp_norm(rows), inf)
            total = torch.maximum(total, split) if inf else total + split
        return total

    counted = [(n, g) for n, g in grads if geometry.owner(n) == pp]
    experts = [(n, g) for n, g in counted if geometry.is_expert(n)]
    dense = [(n, g) for n, g in counted if not geometry.is_expert(n)]
    total, mine = norm_of(dense), _combine(comms["ep"], norm_of(experts), inf)  # each ep rank its experts
    total = torch.maximum(total, mine) if inf else total + mine
    total = _combine(comms["pp"], total, inf)
    norm = total if inf else total ** (1.0 / norm_type)
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        for _, g in grads:
            g.mul_(coef)
    return norm.float()


def _combine(comm, x: torch.Tensor, inf: bool) -> torch.Tensor:
    """The sum (the maximum, for the inf-norm) of ``x`` over the ranks of ``comm``."""
    if comm.world == 1:
        return x
    parts = torch.cat(comm.all_gather(x.reshape(1)))
    return parts.max() if inf else parts.sum()


def _counted_once(g: torch.Tensor, place: Shard, rank: int, rows=None) -> torch.Tensor:
    """``g`` with zeros where a lower tp rank holds the same rows (shared key/value heads), so
    that a sum over the ranks counts every element once. ``rows``: ``g`` is only those dim-0
    rows of the rank's shard (zero)."""
    if not place.has_duplicates:
        return g
    keep = torch.as_tensor(place.primary(rank), device=g.device)
    if rows is not None and place.dim == 0:
        keep = keep[rows[0]:rows[1]]
    shape = [1] * g.dim()
    shape[place.dim] = -1
    return g * keep.view(shape).to(g.dtype)
