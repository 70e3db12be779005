"""The communicator interface that the ops call, and the one that only computes shapes.

``Communicator`` is what a collective op asks of its mesh dimension (all-reduce, all-gather,
reduce-scatter, all-to-all and their counts of what is sent); ``fxpar.runtime.comm`` implements
it over ``torch.distributed`` processes and over threads. ``ShapeComm`` answers with tensors of
the right shapes and no data, for the memory model's fake runs.

Every communicator counts what it sends (ring algorithm: an all-reduce of N elements sends
``2(t-1)/t * N`` per rank, an all-gather or reduce-scatter ``(t-1)/t * N``, an all-to-all of
a local ``N`` ``(t-1)/t * N``), for the reports.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


class Pending:
    """A collective begun in the background: ``wait()`` returns its result (once)."""

    def __init__(self, finish):
        self._finish, self._result, self._done = finish, None, False

    def wait(self):
        if not self._done:
            self._result, self._done = self._finish(), True
            self._finish = None
        return self._result


class Communicator:
    rank: int
    world: int

    def __init__(self):
        self.sent_bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def _count(self, kind: str, numel: int, elem: int, factor: float) -> None:
        self.calls[kind] += 1
        self.sent_bytes[kind] += int(factor * (self.world - 1) / self.world * numel * elem)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, returned as a new tensor."""
        self._count("all_reduce", t.numel(), t.element_size(), 2)
        return self._all_reduce(t.contiguous())

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks into ``t`` itself (contiguous), which is returned: no copy of a large
        flat buffer made only to be reduced (the gradient buckets of data parallelism)."""
        self._count("all_reduce", t.numel(), t.element_size(), 2)
        return self._all_reduce_(t)

    def _all_reduce_(self, t):
        # the peers of a simulated group read what this rank hands them after the exchange:
        # hand them a copy, never ``t`` itself, which is written here
        return t.copy_(self._all_reduce(t.clone()))

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks, returned as a new tensor."""
        self._count("all_reduce", t.numel(), t.element_size(), 2)
        return self._all_reduce_max(t.contiguous())

    def _all_reduce_max(self, t):
        return torch.stack(self._all_gather(t)).amax(0)

    def all_reduce_start(self, t: torch.Tensor) -> "Pending":
        """Sum over ranks into ``t`` (contiguous), begun now and finished by the returned
        handle's ``wait()`` (which returns ``t``): work between the two overlaps it. Here it is
        done at once; ``fxpar.runtime.comm.DistComm`` runs it in the background."""
        out = self.all_reduce_(t)
        return Pending(lambda: out)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (all of the same shape), in rank order."""
        self._count("all_gather", t.numel() * self.world, t.element_size(), 1)
        return self._all_gather(t.contiguous())

    def all_gather_start(self, t: torch.Tensor) -> "Pending":
        """``all_gather`` begun now and finished by the returned handle's ``wait()``, so that
        work between the two overlaps it (a weight prefetched while a layer computes). Here it
        is done at once; ``fxpar.runtime.comm.DistComm`` runs it in the background."""
        out = self.all_gather(t)
        return Pending(lambda: out)

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, like ``all_gather``, for fxpar's own checks between ranks: not
        counted in the traffic reports, which are the model's."""
        return self._all_gather(t.contiguous())

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over ranks, keeping this rank's even chunk along ``dim``."""
        self._count("reduce_scatter", t.numel(), t.element_size(), 1)
        return self._reduce_scatter(t.contiguous(), dim)

    def reduce_scatter_start(self, t: torch.Tensor, dim: int) -> "Pending":
        """``reduce_scatter`` begun now and finished by the returned handle's ``wait()``. Here it
        is done at once; ``fxpar.runtime.comm.DistComm`` runs it in the background."""
        out = self.reduce_scatter(t, dim)
        return Pending(lambda: out)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk ``i`` of ``t`` (its dim 0 split evenly) goes to rank ``i``; returns the chunks
        received, in rank order, stacked the same way."""
        self._count("all_to_all", t.numel(), t.element_size(), 1)
        return self._all_to_all(t.contiguous())

    def _all_to_all(self, t):
        # any communicator can do it with an all-gather; the real ones send only what is needed
        mine = [p.chunk(self.world)[self.rank] for p in self._all_gather(t)]
        return torch.cat(mine)

    def all_to_all_v(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows ``send[i]`` of ``t`` (its dim 0 cut in rank order) go to rank ``i``; returns the
        ``recv[i]`` rows from each rank ``i``, in rank order. Both lists come from an exchange of
        counts (``all_to_all`` of them) made before: every rank knows what it gets."""
        row = math.prod(t.shape[1:])  # a rank may send no rows at all
        self.calls["all_to_all"] += 1
        self.sent_bytes["all_to_all"] += (sum(send) - send[self.rank]) * row * t.element_size()
        return self._all_to_all_v(t.contiguous(), list(send), list(recv))

    def shift_start(self, t: torch.Tensor, kind: str = "ring") -> "Pending":
        """``t`` sent to the next rank (``rank + 1``, around the ring), begun now; the returned
        handle's ``wait()`` gives what the previous rank sent, flat: one step of ring attention,
        or of a collective matmul's all-gather or reduce-scatter, whose bytes count as ``kind``.
        Here it is done at once; ``fxpar.runtime.comm.DistComm`` runs it in the background."""
        if self.world == 1:
            return Pending(lambda: t)
        self.calls[kind] += 1
        self.sent_bytes[kind] += t.numel() * t.element_size()
        return self._shift_start(t.reshape(1, -1).contiguous(), *self._ring_sizes())

    def _ring_sizes(self):
        send, recv = [0] * self.world, [0] * self.world
        send[(self.rank + 1) % self.world] = recv[(self.rank - 1) % self.world] = 1
        return send, recv

    def _shift_start(self, flat, send, recv) -> "Pending":
        out = self._all_to_all_v(flat, send, recv)
        return Pending(lambda: out.view(-1))

    def reset_counters(self) -> None:
        self.sent_bytes.clear()
        self.calls.clear()


class ShapeComm(Communicator):
    """Collectives of the right shapes on fake tensors, as rank 0 of ``world`` (nothing is sent,
    nothing is counted): for running a rank's program to learn its sizes and memory."""

    def __init__(self, world: int):
        super().__init__()
        self.rank, self.world = 0, world

    def all_reduce(self, t):
        return t.clone()

    def all_reduce_(self, t):
        return t

    def all_reduce_max(self, t):
        return t.clone()

    def all_gather(self, t):
        return [t.clone() for _ in range(self.world)]

    def reduce_scatter(self, t, dim):
        return t.chunk(self.world, dim)[0].clone()

    def all_to_all(self, t):
        return t.clone()

    def shift_start(self, t, kind="ring"):
        out = t.clone()
        return Pending(lambda: out)


def shape_comms(mesh) -> dict:
    """A ``ShapeComm`` for every dimension of ``mesh``."""
    from ..mesh import DIM_ORDER

    return {d: ShapeComm(getattr(mesh, d)) for d in DIM_ORDER}
