"""A rank's state beyond its own shards: the full tensors its collectives gather from every
rank's shards (``ParallelModule.full_state_dict``), and its random-number states."""

from __future__ import annotations

import torch

from ..errors import FxparError
from ..geometry import ShardGeometry
from ..ops.context import RNGStreams
from ..ops.params import gather_rows
from ..placement import Shard

_STREAMS = ("replicated", "sharded", "context", "context_sharded")  # fxpar's dropout generators


def full_state_dict(local: dict, geometry: ShardGeometry, rank: int, comms: dict, device) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, whole, under every original name, from ``local``
    (this rank's state dict) and every other rank's: a collective over every mesh dimension's
    communicator in ``comms``. A rank without a tensor sends zeros of its part's shape."""
    pp = geometry.mesh.coordinate(rank)["pp"]
    tp, ep = comms["tp"], comms["ep"]
    out = {}
    for key in sorted(set(geometry.names()) | set(local)):
        template = geometry.template(key)
        if template is None or (key not in local and not geometry.persistent(key)):
            continue
        if key in local:
            t = local[key].detach()
        else:
            t = torch.zeros(geometry.local_shape(key, rank), dtype=template.dtype, device=device)
        rows = geometry.zero_rows(key)
        group = comms[geometry.zero_group(key)] if rows is not None else None
        if group is not None and group.world > 1:  # the tp rank's part from the rows of its replicas
            t = gather_rows(t, rows, group)
        if isinstance(geometry.placement(key), Shard) and tp.world > 1:
            t = geometry.join_tp(key, tp.all_gather(t.contiguous()))
        if ep.world > 1 and geometry.ep_split(key) is not None:
            t = geometry.join_ep(key, ep.all_gather(t.contiguous()))
        elif ep.world > 1 and geometry.ep_holder(key) is not None:
            t = _from_one(ep, t, key in local)
        if comms["pp"].world > 1:
            t = _from_one(comms["pp"], t, geometry.owner(key) == pp)
        out[key] = t.clone()
    return out


def _from_one(comm, t: torch.Tensor, mine: bool) -> torch.Tensor:
    """``t`` of the one rank of ``comm`` where ``mine`` holds, on every rank of it."""
    send = t if mine else torch.zeros_like(t)
    return comm.all_reduce(send.to(torch.uint8) if send.dtype == torch.bool else send).to(t.dtype)


def rng_state(rng: RNGStreams, device: torch.device) -> dict[str, torch.Tensor]:
    """torch's default generator's state (and the CUDA device's, on a GPU) and those of fxpar's
    dropout streams ``rng``, each as ``Generator.get_state()`` gives it."""
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    for name in _STREAMS:
        gen = getattr(rng, name)
        if gen is not None:
            out[name] = gen.get_state()
    return out


def set_rng_state(rng: RNGStreams, device: torch.device, states: dict[str, torch.Tensor]) -> None:
    """Put back what ``rng_state`` returned."""
    for name, state in states.items():
        if name == "torch":
            torch.set_rng_state(state)
        elif name == "cuda":
            torch.cuda.set_rng_state(state, device)
        elif name in _STREAMS and getattr(rng, name) is not None:
            getattr(rng, name).set_state(state)
        else:
            raise FxparError(f"set_rng_state: this rank has no random stream {name!r}")
