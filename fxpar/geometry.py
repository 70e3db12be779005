"""Which rank holds which box of which tensor: ``ShardGeometry``, one answer for ``Plan``,
``ParallelModule`` and the checkpoints.

A parameter or buffer is split up to three ways. Over tp by its placement (``ctx.param_placements``,
keyed by the name the graph reads it by). Over ep, if it is a stacked weight of experts, by expert
(``ctx.expert_shards``: each ep rank its experts, then tp splits those); or, if it is the weight of
one expert module, not at all: one ep rank holds it whole (``ctx.expert_slot``) and the planned
graph reads it under the name of the expert ep rank 0 holds in the same place. Over pp by stage:
the stages whose ``params`` list it hold a copy (several for a tied weight), the first of them the
copy that counts. Over dp, under ``zero``, by dim-0 rows of one tp rank's part
(``ctx.zero_rows``, ``fxpar.ops.params.row_split``); else data-parallel replicas, like cp ranks,
hold the same weights.

Names are the user's (any alias of a tied weight); ranks are positions on the mesh
(``mesh.coordinate(rank)``). Nothing here binds to a process: ``Plan`` assembles full tensors from
every simulated rank's parts with it, ``ParallelModule`` from what its collectives gather.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .capture import Captured
from .mesh import Mesh
from .ops.collectives import _assemble
from .ops.params import row_split
from .placement import REPLICATE, Placement, Shard
from .plan_context import PlanContext
from .shards import local_shape, shard_tensor

Offsets = tuple[int, ...]
Box = tuple[Offsets, torch.Tensor]


class ShardGeometry:
    """Where every parameter and buffer of ``cap`` lies over ``mesh`` under the plan ``ctx``
    (see the module doc). Every answer is the same on every rank."""

    def __init__(self, cap: Captured, ctx: PlanContext, mesh: Mesh):
        self.captured = cap
        self.ctx = ctx
        self.mesh = mesh

    # names ------------------------------------------------------------------------------------
    def target(self, name: str) -> str:
        """The name the captured graph reads ``name`` by."""
        return self.captured.graph_name(name)

    def aliases(self, name: str) -> list[str]:
        """Every name of the tensor ``name`` (tied weights have several), the first one first."""
        return self.captured.aliases.get(name, [name])

    def template(self, name: str) -> torch.Tensor | None:
        """The full tensor ``name`` on the meta device (its shape, dtype and kind); None for a
        name the model does not have."""
        return self.captured.tensors.get(self.aliases(name)[0])

    def persistent(self, name: str) -> bool:
        """Whether ``name`` belongs in a state dict (a non-persistent buffer does not)."""
        return self.captured.persistent.get(name, True)

    def names(self) -> list[str]:
        """Every name of every parameter and buffer of the model."""
        return sorted({a for names in self.captured.aliases.values() for a in names})

    def full_names(self) -> dict[str, tuple[list[str], torch.Size, bool]]:
        """Every parameter and persistent buffer of the whole model (not only one rank's):
        ``{first name: (aliases, full shape, is a parameter)}``."""
        out = {}
        for name, t in self.captured.tensors.items():
            aliases = self.aliases(name)
            if aliases[0] in out or not self.persistent(name):
                continue
            out[aliases[0]] = (list(aliases), t.shape, isinstance(t, nn.Parameter))
        return out

    # where it lies ----------------------------------------------------------------------------
    def _slot(self, name: str) -> tuple[str, int] | None:
        return self.ctx.expert_slot(self.target(name))

    def _planned(self, name: str) -> str:
        """The name the plan keys ``name`` by: an expert module's weight by the one ep rank 0 holds."""
        slot = self._slot(name)
        return slot[0] if slot else self.target(name)

    def placement(self, name: str) -> Placement:
        """``name``'s placement over the tp ranks (of one ep rank's part, for experts split over ep)."""
        return self.ctx.param_placements.get(self._planned(name), REPLICATE)

    def ep_split(self, name: str) -> Shard | None:
        """How a stacked weight of experts is split over the ep ranks (None for any other tensor)."""
        return self.ctx.expert_shards.get(self.target(name))

    def ep_holder(self, name: str) -> int | None:
        """The ep rank holding the weight of an expert module (None for any other tensor)."""
        slot = self._slot(name)
        return None if slot is None else slot[1]

    def is_expert(self, name: str) -> bool:
        """Whether ``name`` is a weight of the experts split over the ep ranks."""
        return self.ctx.is_expert(self.target(name))

    def holds(self, name: str, rank: int) -> bool:
        """Whether ``rank``'s ep rank holds ``name``: all do, but for an expert module's weight,
        which one ep rank holds (which pipeline stages hold it: ``owner``)."""
        holder = self.ep_holder(name)
        return holder is None or holder == self.mesh.coordinate(rank)["ep"]

    def owner(self, name: str) -> int:
        """The pipeline rank whose copy of ``name`` counts: the first stage holding it (0 for a
        tensor no stage reads, which pipeline rank 0 keeps)."""
        planned = self._planned(name)  # stages name the experts of ep rank 0
        ranks = [s.rank for s in self.ctx.pipeline.stages if planned in s.params]
        return min(ranks) if ranks else 0

    def holders(self, name: str) -> list[int]:
        """The ranks (of cp rank 0; of data-parallel replica 0 unless zero splits ``name`` over
        dp) whose parts make up ``name``: the tp ranks of its owning stage on every ep rank
        holding a part of it, by ep rank, then tp rank, then dp rank."""
        split, holder = self.ep_split(name), self.ep_holder(name)
        rows = self.zero_rows(name) is not None
        over_ep = rows and self.zero_group(name) == "dp_ep"  # a dense weight's rows over dp x ep
        eps = range(self.mesh.ep) if split is not None or over_ep else [holder or 0]
        dps = range(self.mesh.dp) if rows else [0]
        pp = self.owner(name)
        return [self.mesh.rank_of(pp=pp, ep=e, tp=t, dp=d) for e in eps for t in range(self.mesh.tp) for d in dps]

    def zero_rows(self, name: str) -> int | None:
        """The dim-0 size of one tp rank's part of ``name`` that zero splits over the dp ranks
        (None where it does not)."""
        return self.ctx.zero_rows.get(self._planned(name))

    def zero_group(self, name: str) -> str:
        """The ranks zero splits ``name`` over: ``"dp"``, or ``"dp_ep"`` for a dense weight under
        expert parallelism (``PlanContext.zero_group``)."""
        return self.ctx.zero_group(self._planned(name))

    def dp_rows(self, name: str, rank: int) -> tuple[int, int] | None:
        """``(start, stop)``: the rows of its tp rank's part of ``name`` that ``rank`` holds
        under zero (None where zero does not split ``name``)."""
        rows = self.zero_rows(name)
        if rows is None:
            return None
        planned = self._planned(name)
        return row_split(rows, self.ctx.zero_world(planned))[self.ctx.zero_index(planned, self.mesh.coordinate(rank))]

    def local_shape(self, name: str, rank: int | None = None) -> list[int]:
        """The shape of one rank's part of ``name`` (of ``rank``'s, where zero splits it over dp;
        without ``rank``, of its whole tp part)."""
        shape, split = self.template(name).shape, self.ep_split(name)
        out = local_shape(shape if split is None else local_shape(shape, split), self.placement(name))
        rows = self.dp_rows(name, rank) if rank is not None else None
        if rows is not None:
            out[0] = rows[1] - rows[0]
        return out

    # one rank's part ---------------------------------------------------------------------------
    def local_shard(self, name: str, full: torch.Tensor, rank: int) -> torch.Tensor | None:
        """``rank``'s part of ``full``, a whole value of ``name``: its ep rank's experts of a stacked
        expert weight, then its tp rank's slice. None for an expert module's weight another ep rank
        holds."""
        if not self.holds(name, rank):
            return None
        where = self.mesh.coordinate(rank)
        split = self.ep_split(name)
        if split is not None:
            full = shard_tensor(full, split, where["ep"])
        part = shard_tensor(full, self.placement(name), where["tp"])
        rows = self.dp_rows(name, rank)
        return part if rows is None else part[rows[0]:rows[1]].clone()

    def pieces(self, name: str, local: torch.Tensor, rank: int) -> list[Box]:
        """``(offsets in the full tensor, view)`` boxes of ``local``, ``rank``'s part of ``name``
        (its shard, or a tensor laid out like it: a gradient, an optimizer state)."""
        where = self.mesh.coordinate(rank)
        boxes = pieces_of(local, self.placement(name), where["tp"], self.dp_rows(name, rank))
        split = self.ep_split(name)
        if split is None:
            return boxes
        (start, _), = split.runs[where["ep"]]
        return [((o[0] + start, *o[1:]), v) for o, v in boxes]

    # the whole from the parts ---------------------------------------------------------------------
    def join_tp(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """``name`` whole over tp from every tp rank's part (by tp rank)."""
        return join(parts, self.placement(name))

    def join_ep(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """A stacked expert weight whole from every ep rank's experts (by ep rank), each whole over tp."""
        return join(parts, self.ep_split(name))

    def full(self, name: str, part: Callable[[int], torch.Tensor | None]) -> torch.Tensor | None:
        """The whole tensor ``name`` from ``part(rank)`` of every rank in ``holders(name)``; None
        where one of them has none."""
        by_tp: dict[tuple, list] = {}
        split = self.ep_split(name) is not None
        planned = self._planned(name)
        for r in self.holders(name):
            c = self.mesh.coordinate(r)
            # rows in the order zero split them (over dp, or dp x ep for a dense weight)
            by_tp.setdefault((c["ep"] if split else 0, c["tp"]), []).append((self.ctx.zero_index(planned, c), part(r)))
        if any(p is None for parts in by_tp.values() for _, p in parts):
            return None
        by_ep: dict[int, list] = {}
        for (e, _), rows in sorted(by_tp.items()):  # a tp rank's part from its replicas' rows
            rows = [p for _, p in sorted(rows, key=lambda ip: ip[0])]
            by_ep.setdefault(e, []).append(rows[0] if len(rows) == 1 else torch.cat(rows))
        wholes = [self.join_tp(name, parts) for _, parts in sorted(by_ep.items())]
        return wholes[0] if self.ep_split(name) is None else self.join_ep(name, wholes)


def join(parts: list[torch.Tensor], placement) -> torch.Tensor:
    """The whole value from every rank's part (by rank over the dimension ``placement`` is over):
    the parts put in their places for a split, the first for a replicated value."""
    if not isinstance(placement, Shard):
        return parts[0]
    shape = list(parts[0].shape)
    shape[placement.dim] = placement.size
    return _assemble(parts, placement, shape)


def pieces_of(local: torch.Tensor, placement: Placement, rank: int, rows: tuple[int, int] | None = None) -> list[Box]:
    """``(offsets, view)`` boxes of the full tensor that ``local`` (rank ``rank``'s shard) holds.

    A rank's local tensor is the concatenation, along the split dim, of the runs its placement
    gives it; each run is a box of the full tensor at some offset. Boxes are cut at every boundary
    of every rank's runs, so two ranks holding the same elements (key/value heads shared by
    several tp ranks) hold identical boxes, which a checkpoint stores once. ``rows``: ``local``
    is only rows ``start:stop`` (dim 0) of the rank's shard (its dp rank's under zero).

    >>> from fxpar.placement import Shard
    >>> p = Shard.segmented(0, 12, 2, bounds=(4, 8))   # rank 1 holds rows 2:4, 6:8, 10:12
    >>> [(o, tuple(v.shape)) for o, v in pieces_of(torch.zeros(6, 3), p, 1)]
    [((2, 0), (2, 3)), ((6, 0), (2, 3)), ((10, 0), (2, 3))]
    """
    local = local.detach()
    zero = [0] * local.dim()
    first, last = rows if rows is not None else (0, None)
    if not isinstance(placement, Shard) or placement.dim != 0:
        zero[:1] = [first] if local.dim() else []
    if not isinstance(placement, Shard):
        return [(tuple(zero), local)]
    cuts = sorted({x for runs in placement.runs for run in runs for x in run})
    out, pos = [], 0
    for a, b in placement.runs[rank]:
        inner = [c for c in cuts if a < c < b]
        for lo, hi in zip([a, *inner], [*inner, b]):
            start, stop = pos + lo - a, pos + hi - a  # where this box lies in the whole shard
            if placement.dim == 0 and rows is not None:  # only rows first:last of the shard are here
                start, stop = max(start, first), min(stop, last)
                if start >= stop:
                    continue
            offsets = list(zero)
            offsets[placement.dim] = lo + start - (pos + lo - a)
            shift = first if placement.dim == 0 else 0
            out.append((tuple(offsets), local.narrow(placement.dim, start - shift, stop - start)))
        pos += b - a
    return out
