"""Weights sharded over the data-parallel ranks (ZeRO), and the op that makes one whole where a
layer reads it.

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
    """One weight as one rank holds it under ``zero=level``: ``rows_here`` (the Parameter the
    optimizer steps, rows ``start:stop`` of ``rows``), and for zero 1 and 2 the whole weight
    ``full`` whose view they are, refreshed by an all-gather when their version moves on; for
    zero 1 the step's gradient of the whole weight (``full_grad``) until ``finish``."""

    def __init__(self, name: str, level: int, rows_here: torch.nn.Parameter, rows: int, start: int, stop: int,
                 full: torch.Tensor | None):
        self.name, self.level, self.rows = name, level, rows
        self.rows_here, self.start, self.stop = rows_here, start, stop
        self.full = full
        self.version = rows_here._version
        self.full_grad: torch.Tensor | None = None
        self.lock = threading.Lock()

    def whole(self, comm) -> torch.Tensor:
        """The whole weight for a layer to read."""
        if self.level == 3:
            return gather_rows(self.rows_here, self.rows, comm)
        if self.rows_here._version != self.version:  # the optimizer (or a load) changed the rows
            with torch.no_grad():
                self.full.copy_(gather_rows(self.rows_here, self.rows, comm))
            self.version = self.rows_here._version
        return self.full.detach()

    def accumulate(self, grad: torch.Tensor) -> None:
        with self.lock:
            self.full_grad = grad.clone() if self.full_grad is None else self.full_grad.add_(grad)

    def finish(self, comm) -> None:
        """zero 1, after the step's last backward: the rows' share of the averaged gradient."""
        if self.full_grad is None:
            return
        mine = scatter_rows(self.full_grad, self.rows, comm)
        self.full_grad = None
        p = self.rows_here
        p.grad = mine if p.grad is None else p.grad.add_(mine)


SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # rows Parameter -> Sharded
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
    def forward(ctx, rows_here, rows, comm):
        ctx.entry, ctx.rows, ctx.comm = SHARDED.get(rows_here), rows, comm
        ctx.defer = _STEP.get()  # read here: backward may run on another thread
        if ctx.entry is None:
            return gather_rows(rows_here, rows, comm)
        out = ctx.entry.whole(comm)
        if ctx.entry.level == 3:
            SavedGathers.track(out, ctx.entry, comm)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.entry is not None and ctx.entry.level == 1 and ctx.defer:
            ctx.entry.accumulate(g)
            return None, None, None
        return scatter_rows(g, ctx.rows, ctx.comm), None, None


@op("gather_param(Tensor rows_here, SymInt rows, *, str group='dp') -> Tensor")
def gather_param(rows_here: torch.Tensor, rows: int, *, group: str = "dp") -> torch.Tensor:
    """The whole weight of ``rows`` rows from this dp rank's rows of it (see the module doc)."""
    return _GatherParam.apply(rows_here, rows, current().comm(group))


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
        full = ref() if ref is not None and version == entry.rows_here._version else None
        if full is None:
            full = gather_rows(entry.rows_here, entry.rows, saved.comm)
            entry.regathered = (entry.rows_here._version, weakref.ref(full))
        return full.as_strided(saved.size, saved.stride, saved.offset)

    @classmethod
    def hooks(cls):
        """The context under which a zero-3 program's forward runs."""
        return torch.autograd.graph.saved_tensors_hooks(cls.pack, cls.unpack)
