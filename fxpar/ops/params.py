"""Weights held other than as the layers read them: rows over the data-parallel ranks (ZeRO), fp32
masters of weights the layers read in bf16 (``precision``); and the op that makes one whole, in
the compute dtype, where a layer reads it.

With ``zero=1|2|3`` every trainable weight is held in dim-0 rows split over the dp ranks, a
balanced split (``row_split``): the first ``rows % dp`` ranks hold one row more. The optimizer
steps those rows only (``pm.parameters()`` are the rows), so its state is ``1/dp`` of the
weight's. The per-rank program reads each weight through ``torch.ops.fxpar.gather_param``,
placed just before the op that uses it:

=====  ==========================================  ==========================================
zero   forward                                     backward
=====  ==========================================  ==========================================
1      the whole weight, kept on every rank         gradient summed whole; after the step's
       (refreshed by an all-gather once the        last microbatch, reduce-scattered into the
       optimizer has changed the rows)             rows' ``.grad``
2      the same                                    reduce-scattered at once into the rows
3      all-gathered from the rows, freed after      the same; the weight the layer saved for
       the layer (``SavedGathers``)                backward is gathered again when it is used
=====  ==========================================  ==========================================

Gradients come out averaged over the dp ranks, as data parallelism averages them. The rows of
zero 1 and 2 are views of the whole weight, so they cost no memory of their own.

Under ``precision="bf16"`` the optimizer steps fp32 masters (the rows of them, with zero) while
the layers read bf16 copies: made again from the masters after each step (zero 0), gathered
from bf16 rows (zero 1, 2, 3: half the bytes on the wire). Gradients arrive in bf16, are
reduced in ``reduce_dtype`` (fp32 by default) and land on the masters in fp32. Per parameter:
2 + 4 + 4 + 8 = 18 bytes at zero 0, Megatron's distributed optimizer's 6 + 12/dp at zero 1,
2 + 16/dp at zero 2, 16/dp at zero 3.

Why explicit nodes rather than torch's FSDP2 (``fully_shard`` over the dp sub-mesh on each rank's
module): FSDP2 gathers in module hooks, but a rank's program is one generated graph per pipeline
stage, reading weights that several stages (a tied embedding) or several programs (one per input
signature) share, so there is no module boundary per layer to hook and its gradient reduction
would run beside fxpar's own (tied weights over pp, experts over ep). As nodes of the graph the
gathers are where a layer reads its weight, in the stage that reads it; they show in the dump,
the memory model counts them (``StageMemory.gathered``) and the comm ledger their bytes, and the
reduce-scatters come out of the same backward as every other collective.

A rank's weights are registered in ``SHARDED`` (rows -> ``Sharded``) by the runtime; a graph run
without them (the memory model's fake run) gathers, which has the shapes the run would have.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

from .context import current
from .library import op


def row_split(rows: int, world: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the rows each of ``world`` ranks holds: a balanced split, the first
    ``rows % world`` ranks one row more.

    >>> row_split(10, 4)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    q, extra = divmod(rows, world)
    out, start = [], 0
    for r in range(world):
        size = q + (r < extra)
        out.append((start, start + size))
        start += size
    return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])


def gather_rows(rows_here: torch.Tensor, rows: int, comm) -> torch.Tensor:
    """The whole weight (``rows`` rows) from every dp rank's rows: one all-gather of equal
    (padded) pieces."""
    spans = row_split(rows, comm.world)
    most = spans[0][1] - spans[0][0]
    parts = comm.all_gather(_pad_rows(rows_here.detach(), most))
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, spans)])


def scatter_rows(grad: torch.Tensor, rows: int, comm) -> torch.Tensor:
    """This rank's rows of the mean over the dp ranks of ``grad`` (a whole weight's gradient):
    one reduce-scatter of equal (padded) pieces."""
    spans = row_split(rows, comm.world)
    most = spans[0][1] - spans[0][0]
    padded = torch.cat([_pad_rows(grad[a:b], most) for a, b in spans])
    a, b = spans[comm.rank]
    return comm.reduce_scatter(padded, 0)[: b - a].div_(comm.world)


class Sharded:
    """One weight as one rank holds it: ``master``, the Parameter the optimizer steps (rows
    ``start:stop`` of ``rows`` under zero 1, 2 and 3 at ``level``; all of it at level 0, where
    only ``dtype`` or the place differs from the master's); for levels 0, 1 and 2 the whole weight
    ``full`` in the compute ``dtype`` on ``device`` (the master's rows are a view of it when the
    dtypes and places agree), made again when the master's version moves on (an optimizer step, a
    load); for zero 1 the step's gradient of the whole weight (``full_grad``) until ``finish``.
    Gradients are reduced over dp in ``reduce_dtype`` and given to the master in its own dtype,
    where it lives (``host``: in host memory, ``offload="optimizer"``)."""

    def __init__(self, name: str, level: int, master: torch.nn.Parameter, rows: int | None, start: int, stop: int,
                 full: torch.Tensor | None, dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, host: bool = False):
        self.name, self.level, self.rows = name, level, rows
        self.master, self.start, self.stop = master, start, stop
        self.full, self.dtype, self.reduce_dtype = full, dtype, reduce_dtype
        self.device, self.host = device if device is not None else master.device, host
        self.version = master._version if full is not None else None
        self.full_grad: torch.Tensor | None = None
        self.lock = threading.Lock()

    def gather(self, comm) -> torch.Tensor:
        """The whole weight in the compute dtype, on the device, from every dp rank's rows (cast
        before they are sent: bf16 rows cost half the bytes)."""
        mine = self.master.detach().to(device=self.device, dtype=self.dtype, non_blocking=self.host)
        return mine if self.level == 0 else gather_rows(mine, self.rows, comm)

    def whole(self, comm) -> torch.Tensor:
        """The whole weight for a layer to read."""
        if self.level == 3:
            return self.gather(comm)
        if self.master._version != self.version:  # the optimizer (or a load) changed the master
            with torch.no_grad():
                self.full.copy_(self.gather(comm))
            self.version = self.master._version
        return self.full.detach()

    def _to_master(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(device=self.master.device, dtype=self.master.dtype)

    def grad(self, g: torch.Tensor, comm, deferred: bool):
        """What backward gives the master for ``g``, the whole weight's gradient (None under
        zero 1 within a step, which reduces at its end; offloaded, zero 1 reduces at once, so no
        whole gradient stays on the device)."""
        if self.level == 0:
            return self._to_master(g)
        if self.level == 1 and deferred and not self.host:
            g = g.to(self.master.dtype)
            with self.lock:
                self.full_grad = g.clone() if self.full_grad is None else self.full_grad.add_(g)
            return None
        return self._to_master(scatter_rows(g.to(self.reduce_dtype), self.rows, comm))

    def finish(self, comm) -> None:
        """zero 1, after the step's last backward: the rows' share of the averaged gradient."""
        if self.full_grad is None:
            return
        mine = scatter_rows(self.full_grad.to(self.reduce_dtype), self.rows, comm).to(self.master.dtype)
        self.full_grad = None
        p = self.master
        p.grad = mine if p.grad is None else p.grad.add_(mine)


SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # master Parameter -> Sharded
_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("fxpar_zero_step", default=False)


@contextlib.contextmanager
def one_step():
    """Within it (a training step over microbatches), zero 1 sums each weight's whole gradient
    and leaves it to ``Sharded.finish``; outside, a backward reduce-scatters at once as zero 2
    does (``loss.backward()`` by the caller has no end of step to wait for)."""
    token = _STEP.set(True)
    try:
        yield
    finally:
        _STEP.reset(token)


class _GatherParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, rows, dtype, comm):
        ctx.entry, ctx.rows, ctx.comm, ctx.dtype = SHARDED.get(weight), rows, comm, weight.dtype
        ctx.defer = _STEP.get()  # read here: backward may run on another thread
        if ctx.entry is None:  # a run without the rank's weights (the memory model's): the shapes
            whole = weight.detach() if rows is None else gather_rows(weight, rows, comm)
            return whole.to(dtype) if dtype is not None else whole.clone()
        out = ctx.entry.whole(comm)
        if ctx.entry.level == 3:
            SavedGathers.track(out, ctx.entry, comm)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.entry is not None:
            return ctx.entry.grad(g, ctx.comm, ctx.defer), None, None, None
        g = g.to(ctx.dtype)
        return (g if ctx.rows is None else scatter_rows(g, ctx.rows, ctx.comm)), None, None, None


@op("gather_param(Tensor weight, SymInt? rows=None, ScalarType? dtype=None, *, str group='dp') -> Tensor")
def gather_param(weight: torch.Tensor, rows=None, dtype=None, *, group: str = "dp") -> torch.Tensor:
    """The whole weight (of ``rows`` rows, from this dp rank's rows of it; ``rows=None``: it is
    whole already) in ``dtype`` (None: its own). See the module doc."""
    return _GatherParam.apply(weight, rows, dtype, current().comm(group))


class _Saved:
    """A gathered weight autograd saved, by what it takes to gather it again."""

    __slots__ = ("entry", "comm", "size", "stride", "offset")

    def __init__(self, entry, comm, t):
        self.entry, self.comm = entry, comm
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class SavedGathers:
    """``saved_tensors_hooks`` for zero 3: a weight ``gather_param`` made, or a view of it, is
    saved for backward as what it takes to gather it again, so the whole weight is freed once
    its layer's forward is done and gathered again for its backward (FSDP's reshard after
    forward). A weight gathered again serves every op of the backward that saved it while it
    lives."""

    _live: dict = {}  # storage address -> (weak reference to the storage, Sharded)
    _lock = threading.Lock()

    @classmethod
    def track(cls, full: torch.Tensor, entry: Sharded, comm) -> None:
        storage = full.untyped_storage()
        with cls._lock:
            for key in [k for k, (ref, _) in cls._live.items() if ref.expired()]:
                del cls._live[key]
            cls._live[storage.data_ptr()] = (StorageWeakRef(storage), entry)

    @classmethod
    def pack(cls, t):
        if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
            return t
        hit = cls._live.get(t.untyped_storage().data_ptr())
        if hit is None or hit[0].expired():  # an address a freed weight used is not that weight
            return t
        return _Saved(hit[1], current().comm("dp"), t)

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        entry = saved.entry
        version, ref = getattr(entry, "regathered", (None, None))
        full = ref() if ref is not None and version == entry.master._version else None
        if full is None:
            full = entry.gather(saved.comm)
            entry.regathered = (entry.master._version, weakref.ref(full))
        return full.as_strided(saved.size, saved.stride, saved.offset)

    @classmethod
    def hooks(cls):
        """The context under which a zero-3 program's forward runs."""
        return torch.autograd.graph.saved_tensors_hooks(cls.pack, cls.unpack)
