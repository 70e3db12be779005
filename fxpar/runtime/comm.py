"""Communicators: the collectives fxpar needs, over a real process group or over threads.

``DistComm`` runs on ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU) and waits on
every collective with a timeout, so a rank whose peer died raises instead of hanging.
``ThreadComm`` gives simulated ranks, one per thread in one process, the same semantics; sums
are taken in rank order on every rank, so all ranks get bit-identical results.

Both implement ``fxpar.ops.comm.Communicator``, which counts what is sent for the reports.
"""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist

from ..errors import CollectiveError
from ..mesh import DIM_ORDER
from ..ops.comm import Communicator, Pending


class DistComm(Communicator):
    """Collectives over a ``torch.distributed`` process group, each waited on with ``timeout``."""

    def __init__(self, group, timeout: datetime.timedelta, name: str = "tp"):
        super().__init__()
        self.group = group
        self.timeout = timeout
        self.name = name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def _wait(self, work, what: str, t: torch.Tensor):
        try:
            work.wait(timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise different types
            on_mesh = self.name in DIM_ORDER
            where = f"mesh dimension '{self.name}'" if on_mesh else f"the {self.name} process group"
            stopped = "stopped calling the model" if on_mesh else "did not make the same call"
            raise CollectiveError(
                f"{what} of {tuple(t.shape)} {t.dtype} on {where} "
                f"(rank {self.rank} of {self.world}, timeout {self.timeout.total_seconds():.0f}s) failed: {e}. "
                f"Another rank has probably failed or {stopped}; its own error says why."
            ) from e

    def _all_reduce(self, t):
        out = t.clone()
        self._wait(dist.all_reduce(out, group=self.group, async_op=True), "all_reduce", t)
        return out

    def _all_reduce_(self, t):
        self._wait(dist.all_reduce(t, group=self.group, async_op=True), "all_reduce", t)
        return t

    def all_reduce_start(self, t):
        self._count("all_reduce", t.numel(), t.element_size(), 2)
        work = dist.all_reduce(t, group=self.group, async_op=True)

        def finish():
            self._wait(work, "all_reduce", t)
            return t

        return Pending(finish)

    def _all_reduce_max(self, t):
        out = t.clone()
        self._wait(dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group, async_op=True), "all_reduce(max)", t)
        return out

    def _all_gather(self, t):
        return self._all_gather_start(t).wait()

    def all_gather_start(self, t):
        self._count("all_gather", t.numel() * self.world, t.element_size(), 1)
        return self._all_gather_start(t.contiguous())

    def _all_gather_start(self, t):
        flat = t.reshape(-1)
        out = torch.empty(self.world * flat.numel(), dtype=t.dtype, device=t.device)
        # gloo wants the output shaped (world * d0, ...): gather the flattened tensor
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(out, flat, group=self.group, async_op=True)

        def finish():
            self._wait(work, "all_gather", t)
            return [c.view(t.shape) for c in out.chunk(self.world)]

        return Pending(finish)

    def _reduce_scatter(self, t, dim):
        return self._reduce_scatter_start(t, dim).wait()

    def _reduce_scatter_start(self, t, dim):
        if t.device.type == "cuda":
            chunks = [c.contiguous() for c in t.chunk(self.world, dim)]
            out = torch.empty_like(chunks[self.rank])
            work = dist.reduce_scatter(out, chunks, group=self.group, async_op=True)

            def finish():
                self._wait(work, "reduce_scatter", t)
                return out
        else:
            # gloo has no reduce_scatter: all-reduce and keep a copy of the chunk (a view would
            # keep the whole sum alive with it: a zero-2 gradient would cost the weight's size)
            total = t.clone()
            work = dist.all_reduce(total, group=self.group, async_op=True)

            def finish():
                self._wait(work, "reduce_scatter", t)
                return total.chunk(self.world, dim)[self.rank].clone(memory_format=torch.contiguous_format)

        return Pending(finish)

    def reduce_scatter_start(self, t, dim):
        self._count("reduce_scatter", t.numel(), t.element_size(), 1)
        return self._reduce_scatter_start(t.contiguous(), dim)

    def _all_to_all(self, t):
        out = torch.empty_like(t)
        self._wait(dist.all_to_all_single(out, t, group=self.group, async_op=True), "all_to_all", t)
        return out


    def _all_to_all_v(self, t, send, recv):
        out = t.new_empty((sum(recv), *t.shape[1:]))
        work = dist.all_to_all_single(out, t, output_split_sizes=recv, input_split_sizes=send, group=self.group,
                                      async_op=True)
        self._wait(work, "all_to_all (variable sizes)", t)
        return out

    def _shift_start(self, flat, send, recv):
        out = torch.empty_like(flat)
        work = dist.all_to_all_single(out, flat, output_split_sizes=recv, input_split_sizes=send, group=self.group,
                                      async_op=True)

        def finish():
            self._wait(work, "ring attention's shift", flat)
            return out.view(-1)

        return Pending(finish)


class ThreadWorld:
    """Meeting point of the simulated ranks of one group."""

    def __init__(self, world: int, timeout: float = 120.0):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots: list = [None] * world

    def exchange(self, rank: int, obj) -> list:
        try:
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        except threading.BrokenBarrierError:
            raise CollectiveError(
                f"simulated rank {rank}: another rank failed or a rank skipped a collective"
            ) from None

    def abort(self) -> None:
        self.barrier.abort()


class ThreadComm(Communicator):
    def __init__(self, world: ThreadWorld, rank: int):
        super().__init__()
        self.shared = world
        self.rank = rank
        self.world = world.world

    def _all_reduce(self, t):
        parts = self.shared.exchange(self.rank, t)
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p
        return out

    def _all_gather(self, t):
        return [p.clone() for p in self.shared.exchange(self.rank, t)]

    def _reduce_scatter(self, t, dim):
        return self._all_reduce(t).chunk(self.world, dim)[self.rank].clone(memory_format=torch.contiguous_format)

    def _all_to_all_v(self, t, send, recv):
        # copies: the peers read them after the exchange, when this rank may reuse ``t``
        parts = self.shared.exchange(self.rank, [p.clone() for p in t.split(send)])
        got = [p[self.rank] for p in parts]
        if [g.shape[0] for g in got] != recv:
            raise CollectiveError(f"simulated rank {self.rank} expected rows {recv} from the ranks, got {[g.shape[0] for g in got]}")
        return torch.cat(got)


class LocalComm(Communicator):
    """A group of one rank (tp=1): every collective is the identity."""

    def __init__(self):
        super().__init__()
        self.rank, self.world = 0, 1

    def _all_reduce(self, t):
        return t.clone()

    def _all_gather(self, t):
        return [t.clone()]

    def _all_to_all(self, t):
        return t.clone()

    def _all_to_all_v(self, t, send, recv):
        return t.clone()

    def _reduce_scatter(self, t, dim):
        return t.clone()
