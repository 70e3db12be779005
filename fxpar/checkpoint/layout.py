"""Where each of a rank's tensors sits in the full tensor.

A rank's local tensor is the concatenation, along the split dim, of the runs its placement gives
it (one run for an even split; several for a fused projection split per segment, e.g. q, k and v
of a fused attention input). Each run is a box of the full tensor at some offset: a *piece*.
Readers fill pieces from files and checkpoints; writers store them. Pieces are cut at every
boundary of every rank's runs, so two ranks holding the same elements (replicas over dp, copies
over pp, key/value heads shared by several tp ranks) hold identical pieces, which a checkpoint
stores once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import FxparError
from ..placement import Placement, Shard

Offsets = tuple[int, ...]


@dataclass
class LocalTensor:
    """One parameter or persistent buffer as this rank holds it.

    ``name`` is its first original name, ``aliases`` all of them (tied weights have several),
    ``tensor`` the local shard (the module's own storage), ``shape`` the full shape and
    ``pieces`` the ``(offsets in the full tensor, view of tensor)`` boxes it is made of.
    """

    name: str
    aliases: list[str]
    tensor: torch.Tensor
    shape: torch.Size
    placement: Placement
    pieces: list[tuple[Offsets, torch.Tensor]]
    is_param: bool


def pieces_of(local: torch.Tensor, placement: Placement, rank: int) -> list[tuple[Offsets, torch.Tensor]]:
    """``(offsets, view)`` boxes of the full tensor that ``local`` (rank ``rank``'s shard) holds.

    >>> from fxpar.placement import Shard
    >>> p = Shard.segmented(0, 12, 2, bounds=(4, 8))   # rank 1 holds rows 2:4, 6:8, 10:12
    >>> [(o, tuple(v.shape)) for o, v in pieces_of(torch.zeros(6, 3), p, 1)]
    [((2, 0), (2, 3)), ((6, 0), (2, 3)), ((10, 0), (2, 3))]
    """
    local = local.detach()
    zero = [0] * local.dim()
    if not isinstance(placement, Shard):
        return [(tuple(zero), local)]
    cuts = sorted({x for runs in placement.runs for run in runs for x in run})
    out, pos = [], 0
    for a, b in placement.runs[rank]:
        inner = [c for c in cuts if a < c < b]
        for lo, hi in zip([a, *inner], [*inner, b]):
            offsets = list(zero)
            offsets[placement.dim] = lo
            out.append((tuple(offsets), local.narrow(placement.dim, pos + lo - a, hi - lo)))
        pos += b - a
    return out


def local_tensors(pm) -> list[LocalTensor]:
    """Every parameter and persistent buffer ``pm`` (a ``ParallelModule``) holds on this rank."""
    pm._require_built()
    cap = pm._captured
    out, seen = [], set()
    params = {id(p) for p in pm.parameters()}
    for key, t in pm.state_dict(keep_vars=True).items():
        aliases = cap.aliases.get(key, [key])
        if aliases[0] in seen:
            continue
        seen.add(aliases[0])
        full = cap.tensors.get(aliases[0])
        if full is None:
            raise FxparError(f"'{key}' is in this rank's state but not in the captured model")
        place = pm.placement_of(key)
        out.append(LocalTensor(aliases[0], list(aliases), t, full.shape, place, pm._pieces(key, t), id(t) in params))
    return out


def full_names(pm) -> dict[str, tuple[list[str], torch.Size, bool]]:
    """Every parameter and persistent buffer of the whole model (not only this rank's):
    ``{first name: (aliases, full shape, is a parameter)}``, the same on every rank."""
    cap = pm._captured
    out = {}
    for name, t in cap.tensors.items():
        aliases = cap.aliases.get(name, [name])
        if aliases[0] in out or not cap.persistent.get(name, True):
            continue
        out[aliases[0]] = (list(aliases), t.shape, isinstance(t, nn.Parameter))
    return out
