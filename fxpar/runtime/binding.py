"""What one process of a ``ParallelModule`` is bound to: the ranks that check they agree, and,
once they have agreed on the mesh and the options, its position on the mesh, a communicator per
mesh dimension, the world rank of every mesh position, its dropout streams and point-to-point.
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..mesh import DIM_ORDER, Mesh
from ..ops.context import RankContext, RNGStreams, context_streams, stream_seeds
from .agree import Group
from .comm import DistComm, LocalComm
from .p2p import DistP2P


def everyone(mesh: Mesh, timeout, device, plain: bool) -> Group:
    """The ranks that check they agree: the whole world (a ``Mesh`` must cover it; the checks of
    a torch ``DeviceMesh`` over part of the world are skipped, with a warning)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return Group(LocalComm(), device)
    if world != mesh.size and not plain:
        warnings.warn(f"fxpar: the DeviceMesh covers {mesh.size} of the {world} ranks; the checks that ranks agree "
                      "on their model, options and inputs are skipped", stacklevel=4)
        return Group(LocalComm(), device)
    return Group(DistComm(dist.group.WORLD, timeout, "world"), device)


@dataclass
class Binding:
    """This process on the mesh. ``rank`` is its position on ``mesh`` (``mesh.coordinate``),
    ``to_global`` maps a position to its rank in the world, ``replica_of`` gives, by world rank,
    the part of the batch each trains on."""

    mesh: Mesh
    device_mesh: object
    rank: int
    to_global: Callable[[int], int]
    replica_of: list[int]
    comms: dict
    ctx: RankContext
    p2p: DistP2P


def _replicas(plain: Mesh, comms: dict, to_global, rank: int, timeout) -> object:
    """The communicator over the replicas of a dense weight under expert parallelism: the dp x ep
    ranks at this rank's pp, cp and tp position, dp-major (zero splits dense weights over them).
    Every rank makes every such group, in the same order, as ``new_group`` wants."""
    if plain.ep == 1:
        return comms["dp"]
    if plain.dp == 1:
        return comms["ep"]
    here = plain.coordinate(rank)
    mine = None
    for r in range(plain.size):
        c = plain.coordinate(r)
        if c["dp"] or c["ep"]:
            continue
        ranks = [to_global(plain.rank_of(**{**c, "dp": d, "ep": e})) for d in range(plain.dp) for e in range(plain.ep)]
        group = dist.new_group(ranks, timeout=timeout)
        if all(c[k] == here[k] for k in ("pp", "cp", "tp")):
            mine = group
    return DistComm(mine, timeout, "dp_ep")


def bind(mesh, plain: Mesh, device: torch.device, timeout: datetime.timedelta, exact_rng: bool) -> Binding:
    """Bind to ``mesh`` (a ``Mesh``, whose process groups are made here, or a torch ``DeviceMesh``;
    ``plain`` is it as a ``Mesh``): a collective, made after the ranks agreed on the mesh."""
    device_mesh = plain.bind(device.type, timeout) if isinstance(mesh, Mesh) else mesh
    names = tuple(device_mesh.mesh_dim_names)
    comms = {}
    for dim in DIM_ORDER:
        size = getattr(plain, dim)
        comms[dim] = DistComm(device_mesh.get_group(dim), timeout, dim) if size > 1 else LocalComm()
    coord = dict(zip(names, device_mesh.get_coordinate()))
    rank = plain.rank_of(**coord)

    def to_global(r: int) -> int:  # a position on the mesh -> its rank in the world
        c = plain.coordinate(r)
        return int(device_mesh.mesh[tuple(c[n] for n in names)])

    comms["dp_ep"] = _replicas(plain, comms, to_global, rank, timeout)

    replica_of = [0] * plain.size
    for r in range(plain.size):
        replica_of[to_global(r)] = plain.replica(r)

    where = plain.coordinate(rank)
    pp_rank = where["pp"]
    rep_seed, tp_seed = stream_seeds(torch.initial_seed(), comms["tp"].rank, pp_rank)
    sharded = torch.Generator(device=device).manual_seed(tp_seed)
    # one stage: torch's default generator, as the model would use; several: one per stage
    replicated = None if plain.pp == 1 else torch.Generator(device=device).manual_seed(rep_seed)
    streams = RNGStreams(replicated, sharded, exact_rng)
    if plain.cp > 1:
        streams.context, streams.context_sharded = context_streams(
            torch.initial_seed(), comms["tp"].rank, pp_rank, where["cp"], device)
    ctx = RankContext(rank=comms["tp"].rank, comms=comms, rng=streams)
    return Binding(plain, device_mesh, rank, to_global, replica_of, comms, ctx, DistP2P(timeout))
