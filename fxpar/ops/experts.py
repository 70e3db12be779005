"""Expert parallelism at run time: tokens travel to the ranks holding their experts and back.

Each of the ``ep`` ranks holds ``L = E / ep`` consecutive experts of a layer (rank ``q`` experts
``q*L .. q*L+L-1``) and routes its own tokens. ``dispatch`` takes the rows the router picked,
grouped by expert, and sends each group to its expert's rank: first the counts (an
``all_to_all`` of ``(ep, L)`` integers), then the rows (an ``all_to_all_v``). Every rank gets
the rows of all ranks for its experts, grouped by expert (and by sending rank inside an
expert), so its experts run on them as on a single device. ``combine`` sends the results back
along the same counts; backward of each is the other one. Nothing is dropped and nothing is
padded: the counts are exchanged every step.

Two forms, for the two ways experts are written:

=================  =============================================  ===============================
function           takes                                          returns
=================  =============================================  ===============================
``dispatch``       rows sorted by expert and their cumulative     this rank's experts' rows, their
                   counts ``offs`` (grouped matmuls)              offsets, the ``splits``
``combine``        ``dispatch``'s rows after the experts,          the rows in the order
                   ``splits``                                     ``dispatch`` was given them
``dispatch_rows``  one tensor of rows per expert (a loop over      one per local expert, the
                   expert modules)                                ``splits``
``combine_rows``   one result per local expert, ``splits``         one result per expert
=================  =============================================  ===============================

``splits`` is a ``(2, ep, L)`` integer tensor: the rows this rank sent to each rank ``q`` for
each of ``q``'s experts, and the rows it got from each rank for each of its own. ``rows`` arguments give the
sizes of what comes back, for runs on fake tensors (planning) where no counts exist. Each
dispatch records the rows its experts got in ``RankContext.routed`` under ``layer``, for the
expert report.
"""

from __future__ import annotations

import torch

from ..errors import FxparError
from .context import current


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _fresh_rows(like: torch.Tensor):
    """A size known only at run time (rows a rank receives), for a run on fake tensors."""
    size = like.fake_mode.shape_env.create_unbacked_symint()
    torch._check(size >= 0)
    return size


def _expert_major(rows: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """Rows received rank after rank (each its experts in order) -> expert after expert."""
    ranks, local = len(counts), len(counts[0])
    pieces = rows.split([c for per_rank in counts for c in per_rank])
    return torch.cat([pieces[s * local + j] for j in range(local) for s in range(ranks)])


def _rank_major(rows: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """The inverse of ``_expert_major``."""
    ranks, local = len(counts), len(counts[0])
    pieces = rows.split([counts[s][j] for j in range(local) for s in range(ranks)])
    return torch.cat([pieces[j * ranks + s] for s in range(ranks) for j in range(local)])


def _send(x, sent: list[list[int]], got: list[list[int]], comm) -> torch.Tensor:
    """Rows grouped by destination (``sent[q][j]`` for rank q's expert j) -> this rank's experts'
    rows from every rank, expert-major."""
    rows = comm.all_to_all_v(x, [sum(c) for c in sent], [sum(c) for c in got])
    return _expert_major(rows, got)


def _send_back(y, sent: list[list[int]], got: list[list[int]], comm) -> torch.Tensor:
    """The inverse of ``_send``: results of this rank's experts back to the ranks they came from."""
    return comm.all_to_all_v(_rank_major(y, got), [sum(c) for c in got], [sum(c) for c in sent])


class _Dispatch(torch.autograd.Function):
    """``_send`` forward, ``_send_back`` backward (``_Combine``: the other way round)."""

    there, back = staticmethod(_send), staticmethod(_send_back)

    @classmethod
    def forward(cls, ctx, x, sent, got, comm):
        ctx.sent, ctx.got, ctx.comm = sent, got, comm
        return cls.there(x, sent, got, comm)

    @classmethod
    def backward(cls, ctx, g):
        return cls.back(g.contiguous(), ctx.sent, ctx.got, ctx.comm), None, None, None


class _Combine(_Dispatch):
    there, back = staticmethod(_send_back), staticmethod(_send)


def _exchange_counts(counts: torch.Tensor, comm) -> torch.Tensor:
    """``(2, ep, L)`` splits from this rank's rows per expert ``(E,)``."""
    sent = counts.to(torch.int64).reshape(comm.world, -1)
    got = comm.all_to_all(sent)
    return torch.stack([sent, got])


def _lists(splits: torch.Tensor):
    sent, got = splits.tolist()
    return sent, got


def _record(layer: str | None, splits: torch.Tensor) -> None:
    if layer is not None:
        current().routed[layer] = splits[1].sum(0).tolist()  # rows per local expert, from all ranks


def dispatch(x: torch.Tensor, offs: torch.Tensor, group: str = "ep", layer: str | None = None):
    """Rows ``x`` sorted by expert, ``offs`` the cumulative count of each of the E experts ->
    ``(rows of this rank's experts, their cumulative counts, splits)``."""
    comm = current().comm(group)
    local = offs.shape[0] // comm.world
    if _is_fake(x):
        return (x.new_empty((_fresh_rows(x), *x.shape[1:])), offs.new_empty((local,)),
                torch.empty((2, comm.world, local), dtype=torch.int64, device=x.device))
    counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))
    if int(counts.sum()) != x.shape[0]:
        raise FxparError(
            f"expert parallelism: the grouped matmul's offsets cover {int(counts.sum())} rows but its input has "
            f"{x.shape[0]} (rows padded per expert?): fxpar sends exactly the rows the offsets give each expert"
        )
    splits = _exchange_counts(counts, comm)
    _record(layer, splits)
    sent, got = _lists(splits)
    rows = _Dispatch.apply(x, sent, got, comm)
    return rows, splits[1].sum(0).cumsum(0).to(offs.dtype), splits


def combine(y: torch.Tensor, splits: torch.Tensor, rows, group: str = "ep") -> torch.Tensor:
    """The rows of this rank's experts after them -> the ``rows`` rows dispatch's input had."""
    comm = current().comm(group)
    if _is_fake(y):
        return y.new_empty((rows, *y.shape[1:]))
    sent, got = _lists(splits)
    return _Combine.apply(y, sent, got, comm)


def dispatch_rows(rows: list, group: str = "ep", layer: str | None = None) -> tuple:
    """One tensor of rows per expert -> ``(*rows of each of this rank's experts, splits)``."""
    comm = current().comm(group)
    local = len(rows) // comm.world
    x = torch.cat(rows)
    if _is_fake(x):
        splits = torch.empty((2, comm.world, local), dtype=torch.int64, device=x.device)
        return (*(x.new_empty((_fresh_rows(x), *x.shape[1:])) for _ in range(local)), splits)
    splits = _exchange_counts(torch.tensor([r.shape[0] for r in rows], device=x.device), comm)
    _record(layer, splits)
    sent, got = _lists(splits)
    mine = _Dispatch.apply(x, sent, got, comm)
    return (*mine.split(splits[1].sum(0).tolist()), splits)


def combine_rows(ys: list, splits: torch.Tensor, rows: list, group: str = "ep") -> tuple:
    """One result per local expert -> one per expert, with as many rows as ``dispatch_rows`` was
    given for it (``rows``)."""
    comm = current().comm(group)
    y = torch.cat(ys)
    if _is_fake(y):
        return tuple(y.new_empty((r, *y.shape[1:])) for r in rows)
    sent, got = _lists(splits)
    out = _Combine.apply(y, sent, got, comm)
    return tuple(out.split([c for per_rank in sent for c in per_rank]))
