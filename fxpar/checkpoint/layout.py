"""A rank's tensors as checkpoints read and write them: each parameter and persistent buffer
with the boxes of the full tensor it holds (``ShardGeometry.pieces``, which ``pm.geometry``
answers; ``fxpar/geometry.py`` says how boxes are cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FxparError
from ..geometry import Box
from ..placement import Placement
from .pieces import Pieces


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
    pieces: list[Box]
    is_param: bool


def local_tensors(pm) -> list[LocalTensor]:
    """Every parameter and persistent buffer ``pm`` (a ``ParallelModule``) holds on this rank."""
    geometry = pm.geometry
    out, seen = [], set()
    params = {id(p) for p in pm.parameters()}
    for key, t in pm.state_dict(keep_vars=True).items():
        aliases = geometry.aliases(key)
        if aliases[0] in seen:
            continue
        seen.add(aliases[0])
        full = geometry.template(key)
        if full is None:
            raise FxparError(f"'{key}' is in this rank's state but not in the captured model")
        pieces = geometry.pieces(key, t, pm.rank)
        out.append(LocalTensor(aliases[0], list(aliases), t, full.shape, geometry.placement(key), pieces,
                               id(t) in params))
    return out


def laid_out(pm, lt: LocalTensor, local: torch.Tensor) -> Pieces:
    """``local``, a tensor shaped like ``lt``'s shard (a staging tensor to load into, an optimizer
    state), as the boxes of the full tensor it holds."""
    return Pieces(lt.shape, pm.geometry.pieces(lt.name, local, pm.rank), local)
