"""Weights held other than as the layers read them: rows over the data-parallel ranks (ZeRO), fp32
masters of weights the layers read in bf16 (``precision``), masters in host memory (``offload``);
and the op that makes a layer's weights whole, in the compute dtype, where the layer reads them.

With ``zero=1|2|3`` every trainable weight is held in dim-0 rows split over the dp ranks, a
balanced split (``row_split``): the first ``rows % dp`` ranks hold one row more. The optimizer
steps those rows only (``pm.parameters()`` are the rows), so its state is ``1/dp`` of the
weight's. The per-rank program reads a layer's weights through one
``torch.ops.fxpar.gather_params``, placed just before the layer's first op
(``passes/gather_weights.py``): one collective for all of them, and one for their gradients:

=====  ==========================================  ==========================================
zero   forward                                     backward
=====  ==========================================  ==========================================
1      the whole weights, kept on every rank        gradients summed whole; after the step's
       (refreshed by one all-gather once the       last microbatch, reduce-scattered into the
       optimizer has changed the rows)             rows' ``.grad`` (25 MiB buckets)
2      the same                                    reduce-scattered into the rows, begun as the
                                                   layer's backward ends and finished while the
                                                   layers before it run theirs (``Reductions``)
3      all-gathered from the rows, freed after      the same; the weights the layer saved for
       the layer (``SavedGathers``); the next      backward are gathered again, all at once
       layer's all-gather begins in the            when the first is used, the layer before's
       background meanwhile (``prefetch``)         begun as this layer's backward ends
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
import math
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

from .comm import Pending
from .context import current, current_or_none, traced
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
    return gather_rows_many([rows_here], [rows], comm)[0]


def gather_rows_many(mine: list[torch.Tensor], rows: list[int], comm) -> list[torch.Tensor]:
    """The whole weights from every dp rank's rows of each (all in one dtype): one all-gather of
    one flat piece per rank, each weight's rows padded to the most any rank holds."""
    return gather_rows_start(mine, rows, comm).wait()


def gather_rows_start(mine: list[torch.Tensor], rows: list[int], comm) -> Pending:
    """``gather_rows_many`` begun in the background (``comm.all_gather_start``)."""
    most = [row_split(n, comm.world)[0][1] for n in rows]
    flat = torch.cat([_pad_rows(m.detach(), k).reshape(-1) for m, k in zip(mine, most)])
    pending = comm.all_gather_start(flat)
    sizes = [k * m[0].numel() if m.dim() else k for m, k in zip(mine, most)]

    def finish():
        parts = pending.wait()
        out, start = [], 0
        for m, n, k, size in zip(mine, rows, most, sizes):
            spans = row_split(n, comm.world)
            pieces = [p[start:start + size].view(k, *m.shape[1:])[: b - a] for p, (a, b) in zip(parts, spans)]
            out.append(torch.cat(pieces))
            start += size
        return out

    return Pending(finish)


def scatter_rows_many(grads: list[torch.Tensor], rows: list[int], comm) -> list[torch.Tensor]:
    """This rank's rows of the mean over the dp ranks of each of ``grads`` (whole weights'
    gradients, in one dtype): one reduce-scatter whose chunk for a rank holds its rows of every
    weight, each padded to the most any rank holds."""
    return scatter_rows_start(grads, rows, comm).wait()


def scatter_rows_start(grads: list[torch.Tensor], rows: list[int], comm) -> Pending:
    """``scatter_rows_many`` begun in the background (``comm.reduce_scatter_start``)."""
    most = [row_split(n, comm.world)[0][1] for n in rows]
    chunks = []
    for r in range(comm.world):
        chunks += [_pad_rows(g[slice(*row_split(n, comm.world)[r])], k).reshape(-1)
                   for g, n, k in zip(grads, rows, most)]
    pending = comm.reduce_scatter_start(torch.cat(chunks), 0)
    shapes = [(n, k, g.shape) for g, n, k in zip(grads, rows, most)]

    def finish():
        mine = pending.wait().div_(comm.world)
        out, start = [], 0
        for n, k, shape in shapes:
            size = k * math.prod(shape[1:])
            a, b = row_split(n, comm.world)[comm.rank]
            out.append(mine[start:start + size].view(k, *shape[1:])[: b - a])
            start += size
        return out

    return Pending(finish)


class Reductions:
    """Zero 2 and 3 within a training step: each layer's gradient reduce-scatter, begun as its
    backward ends and finished (its rows added to the masters' ``.grad``) once the next one is
    begun, so that it runs while the layer before computes its backward; ``in_flight=0``: each
    finished at once. What is still in flight when the step ends is finished by ``settle``.
    ``rank``: the rank context its transfers are traced in."""

    def __init__(self, in_flight: int = 1, rank=None):
        self.in_flight, self.rank = in_flight, rank
        self.pending: list[tuple[list, Pending]] = []
        self.lock = threading.Lock()

    def begin(self, entries: list, pending: Pending) -> None:
        with self.lock:
            self.pending.append((entries, pending))
            while len(self.pending) > self.in_flight:
                self._finish(*self.pending.pop(0))

    def settle(self) -> None:
        """Finish every reduction begun (in the order begun)."""
        with self.lock:
            while self.pending:
                self._finish(*self.pending.pop(0))

    @staticmethod
    def _finish(entries: list, pending: Pending) -> None:
        for e, part in zip(entries, pending.wait()):
            g = e._to_master(part)
            p = e.master
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)


class Sharded:
    """One weight as one rank holds it: ``master``, the Parameter the optimizer steps (rows
    ``start:stop`` of ``rows`` under zero 1, 2 and 3 at ``level``; all of it at level 0, where
    only ``dtype`` or the place differs from the master's); for levels 0, 1 and 2 the whole weight
    ``full`` in the compute ``dtype`` on ``device`` (the master's rows are a view of it when the
    dtypes and places agree), made again when the master's version moves on (an optimizer step, a
    load); for zero 1 the step's gradient of the whole weight (``full_grad``) until ``fxpar.runtime.zero.finish``.
    Gradients are reduced over ``group`` (the ranks the rows are split over: ``"dp"``, or
    ``"dp_ep"`` for a dense weight under expert parallelism) in ``reduce_dtype`` and given to the
    master in its own dtype, where it lives (``host``: in host memory, ``offload="optimizer"``)."""

    def __init__(self, name: str, level: int, master: torch.nn.Parameter, rows: int | None, start: int, stop: int,
                 full: torch.Tensor | None, dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, host: bool = False, group: str = "dp"):
        self.name, self.level, self.rows, self.group = name, level, rows, group
        self.master, self.start, self.stop = master, start, stop
        self.full, self.dtype, self.reduce_dtype = full, dtype, reduce_dtype
        self.device, self.host = device if device is not None else master.device, host
        self.version = master._version if full is not None else None
        self.full_grad: torch.Tensor | None = None
        self.lock = threading.Lock()

    def local(self) -> torch.Tensor:
        """This rank's part (rows, or all of it at level 0) in the compute dtype, on the device."""
        return self.master.detach().to(device=self.device, dtype=self.dtype, non_blocking=self.host)

    def whole(self) -> torch.Tensor:
        """The whole weight kept for the layers to read (levels 0, 1, 2), made again from the
        master when the optimizer (or a load) changed it: here at level 0; at 1 and 2 ``wholes``
        gathers it first."""
        if self.master._version != self.version:
            with torch.no_grad():
                self.full.copy_(self.local())
            self.version = self.master._version
        return self.full.detach()

    def _to_master(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(device=self.master.device, dtype=self.master.dtype)

    def accumulate(self, g: torch.Tensor) -> None:
        """Zero 1 within a step: the whole weight's gradient summed until the step's end."""
        g = g.to(self.master.dtype)
        with self.lock:
            self.full_grad = g.clone() if self.full_grad is None else self.full_grad.add_(g)


SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # master Parameter -> Sharded
_STEP: contextvars.ContextVar[Reductions | None] = contextvars.ContextVar("fxpar_zero_step", default=None)


@contextlib.contextmanager
def one_step(background: bool = True):
    """Within it (a training step over microbatches), zero 1 sums each weight's whole gradient
    and leaves it to ``fxpar.runtime.zero.finish``, and zero 2 and 3 begin each layer's
    reduce-scatter in the background (``Reductions``; with ``background=False`` each is finished
    at once), all finished when it ends; outside, a backward reduce-scatters at once
    (``loss.backward()`` by the caller has no end of step to wait for)."""
    reductions = Reductions(1 if background else 0, current_or_none())
    token = _STEP.set(reductions)
    try:
        yield
        reductions.settle()
    finally:
        _STEP.reset(token)


def wholes(entries: list[Sharded], comm, ready: Pending | None = None) -> list[torch.Tensor]:
    """The whole weights for the layers to read, from ``entries`` (one rank's ``Sharded``s): those
    gathered now (every zero-3 weight, a zero-1/2 weight the optimizer changed) in one collective,
    or taken from ``ready``, the gather of the zero-3 ones begun earlier (``prefetch``)."""
    out = [None] * len(entries)
    now = [i for i, e in enumerate(entries) if e.level == 3 or (e.level > 0 and e.master._version != e.version)]
    if now:
        if ready is not None and all(entries[i].level == 3 for i in now):
            fulls = ready.wait()
        else:
            fulls = gather_rows_many([entries[i].local() for i in now], [entries[i].rows for i in now], comm)
        for i, full in zip(now, fulls):
            e = entries[i]
            if e.level == 3:
                out[i] = full
            else:
                with torch.no_grad():
                    e.full.copy_(full)
                e.version = e.master._version
    return [o if o is not None else e.whole() for o, e in zip(out, entries)]


_PREFETCHED: dict = {}  # the next layer's zero-3 masters (by id) -> (its gather begun, the layer that began it)
_PREFETCH_LOCK = threading.Lock()


def prefetch(entries: list[Sharded], comm, starter) -> None:
    """Begin gathering the zero-3 weights of ``entries`` (the next layer's) in the background."""
    split = [e for e in entries if e.level == 3]
    if not split:
        return
    pending = gather_rows_start([e.local() for e in split], [e.rows for e in split], comm)
    with _PREFETCH_LOCK:
        _PREFETCHED[tuple(id(e.master) for e in split)] = (pending, starter)


def _prefetched(entries: list[Sharded]):
    key = tuple(id(e.master) for e in entries if e.level == 3)
    with _PREFETCH_LOCK:
        return _PREFETCHED.pop(key, (None, None)) if key else (None, None)


def reduce_grads(entries: list[Sharded], grads, comm, deferred: Reductions | None) -> list:
    """What backward gives each master for its whole weight's gradient: the gradients split over
    dp reduce-scattered in one collective (in ``reduce_dtype``), begun in the background within
    a step (``deferred``: they reach the masters through it, not autograd), zero 1 within a step
    summed for ``finish``, the rest only moved to where the master is."""
    out = [None] * len(entries)
    now = []
    for i, (e, g) in enumerate(zip(entries, grads)):
        if g is None:
            continue
        if e.level == 0:
            out[i] = e._to_master(g)
        elif e.level == 1 and deferred is not None and not e.host:  # offloaded, the whole gradient leaves the device at once
            e.accumulate(g)
        else:
            now.append(i)
    if now:
        pending = scatter_rows_start([grads[i].to(entries[i].reduce_dtype) for i in now],
                                     [entries[i].rows for i in now], comm)
        if deferred is not None and deferred.in_flight:
            pending = traced(pending, "reduce_scatter", comm, deferred.rank)
        if deferred is not None:  # the rows' gradients land on the masters later, outside autograd
            deferred.begin([entries[i] for i in now], pending)
        else:
            for i, part in zip(now, pending.wait()):
                out[i] = entries[i]._to_master(part)
    return out


class _GatherParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, rows, dtype, n_next, *tensors):
        weights, nxt = tensors[: len(tensors) - n_next], tensors[len(tensors) - n_next:]
        ctx.comm, ctx.rows, ctx.n_next, ctx.dtypes = comm, rows, n_next, [w.dtype for w in weights]
        ctx.entries = [SHARDED.get(w) for w in weights]
        ctx.defer = _STEP.get()  # read here: backward may run on another thread
        if any(e is None for e in ctx.entries):  # a run without the rank's weights (the memory model's): the shapes
            ctx.entries = None
            split = [i for i, n in enumerate(rows) if n >= 0]
            whole = dict(zip(split, gather_rows_many([weights[i] for i in split], [rows[i] for i in split], comm)))
            outs = [whole.get(i, w.detach()) for i, w in enumerate(weights)]
            return tuple(o.to(dtype) if dtype is not None else o.clone() for o in outs)
        ready, before = _prefetched(ctx.entries)
        outs = wholes(ctx.entries, comm, ready)
        bucket = SavedGathers.Bucket([e for e in ctx.entries if e.level == 3], comm, before)
        for e, o in zip(ctx.entries, outs):
            if e.level == 3:
                SavedGathers.track(o, e, bucket)
        ctx.bucket = bucket
        following = [SHARDED.get(w) for w in nxt]
        if following and all(e is not None for e in following):  # while this layer computes
            prefetch(following, comm, bucket)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.entries is None:
            split = [i for i, n in enumerate(ctx.rows) if n >= 0 and grads[i] is not None]
            rows = dict(zip(split, scatter_rows_many([grads[i].to(ctx.dtypes[i]) for i in split],
                                                     [ctx.rows[i] for i in split], ctx.comm)))
            out = [rows.get(i, None if g is None else g.to(ctx.dtypes[i])) for i, g in enumerate(grads)]
        else:
            # every op of the layer has had its backward: the weights regathered for it can go,
            # and the layer before it, whose backward comes next, begins gathering its own
            ctx.bucket.release()
            if ctx.bucket.before is not None:
                ctx.bucket.before.begin_regather()
            out = reduce_grads(ctx.entries, grads, ctx.comm, ctx.defer)
        return (None, None, None, None, *out, *([None] * ctx.n_next))


@op("gather_params(Tensor[] weights, int[] rows, ScalarType? dtype, Tensor[] prefetch, *, str group='dp') -> Tensor[]",
    opaque=True)
def gather_params(weights: list[torch.Tensor], rows: list[int], dtype, prefetch: list[torch.Tensor], *,
                  group: str = "dp") -> list[torch.Tensor]:
    """The whole weights of one layer (each of ``rows[i]`` rows, from this dp rank's rows of it;
    ``-1``: it is whole already) in ``dtype`` (None: their own), gathered in one collective; their
    gradients reduce-scattered in one. ``prefetch``: the next layer's weights (or none), whose
    zero-3 gather begins as this one ends, to run while this layer computes. See the module doc."""
    return list(_GatherParams.apply(current().comm(group), tuple(rows), dtype, len(prefetch), *weights, *prefetch))


class _Saved:
    """A gathered weight autograd saved, by what it takes to gather it again."""

    __slots__ = ("entry", "bucket", "size", "stride", "offset")

    def __init__(self, entry, bucket, t):
        self.entry, self.bucket = entry, bucket
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class SavedGathers:
    """``saved_tensors_hooks`` for zero 3: a weight ``gather_params`` made, or a view of it, is
    saved for backward as what it takes to gather it again, so the whole weights are freed once
    their layer's forward is done and gathered again for its backward (FSDP's reshard after
    forward): the first weight of a layer backward needs gathers all of the layer's (one
    collective), which are kept until the layer's backward is done."""

    _live: dict = {}  # storage address -> (weak reference to the storage, Sharded, Bucket)
    _lock = threading.Lock()

    class Bucket:
        """The zero-3 weights one ``gather_params`` gathered (``before``: the bucket of the layer
        that ran before it, whose backward comes after its own), and those gathered again for
        backward, kept until the layer's backward is done."""

        def __init__(self, entries: list, comm, before=None):
            self.entries, self.comm, self.before = entries, comm, before
            self.again: dict[int, torch.Tensor] = {}  # id(entry) -> whole weight
            self.pending: Pending | None = None

        def begin_regather(self) -> None:
            if self.entries and not self.again and self.pending is None:
                self.pending = gather_rows_start([e.local() for e in self.entries], [e.rows for e in self.entries],
                                                 self.comm)

        def regather(self, entry) -> torch.Tensor:
            if id(entry) not in self.again:
                fulls = wholes(self.entries, self.comm, self.pending)
                self.pending = None
                self.again = {id(e): f for e, f in zip(self.entries, fulls)}
            return self.again[id(entry)]

        def release(self) -> None:
            self.again = {}

    @classmethod
    def track(cls, full: torch.Tensor, entry: Sharded, bucket) -> None:
        storage = full.untyped_storage()
        with cls._lock:
            for key in [k for k, (ref, _, _) in cls._live.items() if ref.expired()]:
                del cls._live[key]
            cls._live[storage.data_ptr()] = (StorageWeakRef(storage), entry, bucket)

    @classmethod
    def pack(cls, t):
        if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
            return t
        hit = cls._live.get(t.untyped_storage().data_ptr())
        if hit is None or hit[0].expired():  # an address a freed weight used is not that weight
            return t
        return _Saved(hit[1], hit[2], t)

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        full = saved.bucket.regather(saved.entry)
        return full.as_strided(saved.size, saved.stride, saved.offset)

    @classmethod
    def hooks(cls):
        """The context under which a zero-3 program's forward runs."""
        return torch.autograd.graph.saved_tensors_hooks(cls.pack, cls.unpack)
