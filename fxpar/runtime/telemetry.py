"""What ranks count while they run, for ``ParallelModule`` and ``Plan`` alike: the bytes each
sends, the tokens routed to each expert, and the last step's actions as a Chrome trace."""

from __future__ import annotations

import json

import torch.distributed as dist

from ..mesh import Mesh
from ..ops.context import RankContext


def comm_bytes(comms: dict, p2p) -> dict:
    """Bytes one rank has sent through ``comms`` (by mesh dimension) and ``p2p``, by collective
    kind (and pipeline sends), since the last ``reset_comm_bytes``."""
    out: dict = {}
    for dim, comm in comms.items():
        for kind, n in comm.sent_bytes.items():
            key = kind if dim == "tp" else f"{dim} {kind}"
            if n:
                out[key] = out.get(key, 0) + n
    if p2p.sent_bytes:
        out["pipeline send"] = p2p.sent_bytes
    return out


def reset_comm_bytes(comms: dict, p2p) -> None:
    """Start counting ``comm_bytes`` again from zero."""
    for comm in comms.values():
        comm.reset_counters()
    p2p.sent_bytes = 0


def routed_rows(ctx: RankContext) -> dict[str, list[int]]:
    """Per mixture-of-experts layer split over ep, the rows (routed token slots, from every ep
    rank) each of the experts of the rank of ``ctx`` got in its last forward."""
    return {layer: list(rows) for layer, rows in ctx.routed.items()}


def routed_by_ep_rank(contexts: list[RankContext], mesh: Mesh, layers) -> dict[str, list[list[int]]]:
    """``routed_rows`` of every ep rank (of dp replica 0, tp rank 0) from the contexts of every
    rank of ``mesh``, per layer of ``layers`` that every ep rank has rows for."""
    rows = [routed_rows(c) for c in contexts]
    out: dict = {}
    for layer in layers:
        per_rank = [None] * mesh.ep
        for r, found in enumerate(rows):
            coord = mesh.coordinate(r)
            if coord["dp"] == 0 and coord["tp"] == 0 and layer.name in found:
                per_rank[coord["ep"]] = found[layer.name]
        if all(p is not None for p in per_rank):
            out[layer.name] = per_rank
    return out


def rank_events(rank: int, prog) -> list[tuple]:
    """The actions of ``prog`` (a ``RankProgram``, or None before any step) in its last step, as
    ``(rank, name, start, end)``."""
    return [(rank, name, t0, t1) for name, t0, t1 in prog.runner.events] if prog is not None else []


def save_trace(path: str, events: list[tuple]) -> None:
    """Write every process's ``events`` to one Chrome trace at ``path``: a collective over the
    world when there is one (every rank must call it; rank 0 writes the file)."""
    if not dist.is_initialized():
        write_chrome_trace(path, events)
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, events)
    if dist.get_rank() == 0:
        write_chrome_trace(path, [e for part in gathered for e in part])


_BESIDE = 10000  # the row of a rank's background collectives: its own, offset


def write_chrome_trace(path: str, events) -> None:
    """``events``: ``(rank, name, start, end)`` in seconds. Compute actions are one colour, sends
    and receives another."""
    t0 = min(e[2] for e in events) if events else 0.0
    # collectives begun in the background (``comm ...``: from begun to waited) get a row of their
    # own under their rank's, so their overlap with its compute shows
    row = lambda rank, name: _BESIDE + rank if name.startswith("comm ") else rank  # noqa: E731
    trace = [
        {"name": name, "ph": "X", "pid": 0, "tid": row(rank, name), "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6,
         "cat": "compute" if name[0] in "FBW" else "comm"}
        for rank, name, a, b in events
    ]
    rows = sorted({(row(r, n), r, n.startswith("comm ")) for r, n, _, _ in events})
    trace += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": f"rank {r}" + (" collectives" if c else "")}}
              for t, r, c in rows]
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)
