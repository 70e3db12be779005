"""Collectives in two parts: ``<collective>_start`` begins one and returns a handle, ``wait``
gives its result. Work placed between the two runs while the data travels
(``passes/overlap_collectives.py`` places them: start where the collective was, wait just before
its first reader).

The handle is a tensor of no elements that carries the collective in flight, so the pair is two
nodes of the graph, two lines of the generated code and two nodes of autograd's graph. Backward
mirrors forward: ``wait``'s backward begins the conjugate collective of the gradient (for
``reduce_scatter`` an all-gather, for ``gather_to_tp`` a reduce-scatter) and ``start``'s backward
waits for it, so the backward of the work between the two (which autograd runs between them, in
reverse order of creation) overlaps it too.

=========================  ===================================  ==========================
op                         forward (begun / finished)           backward (begun / finished)
=========================  ===================================  ==========================
``all_reduce_start``       all-reduce                           (identity)
``reduce_scatter_start``   reduce-scatter                       all-gather
``all_gather_start``       all-gather                           (keep own slice)
``gather_to_tp_start``     all-gather                           reduce-scatter
=========================  ===================================  ==========================

    >>> h = all_reduce_start(attn_out, group="tp")   # the attention block's partial sums travel ...
    >>> m = mlp(x)                                   # ... while a parallel MLP block computes
    >>> y = m + wait(h)
"""

from __future__ import annotations

import torch

from . import collectives as C
from .collectives import _layout, gather_start, own_slice_grad, scatter_grad_start
from .collectives import reduce_scatter_start as _reduce_scatter_start
from .comm import Pending
from .context import current, traced
from .library import op


class _Flight:
    """One collective in flight: its forward result, later its gradient's conjugate."""

    def __init__(self, forward: Pending, backward):
        self.forward, self.begin_backward, self.backward = forward, backward, None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, begin, begin_backward):
        flight = _Flight(begin(x.contiguous()), begin_backward)
        ctx.flight = flight
        handle = x.new_empty(0)
        handle.fxpar_flight = flight
        return handle

    @staticmethod
    def backward(ctx, _):
        pending, ctx.flight.backward = ctx.flight.backward, None
        return (pending.wait() if pending is not None else None), None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, handle):
        flight = getattr(handle, "fxpar_flight", None)
        if flight is None or flight.forward is None:
            raise RuntimeError("fxpar.wait: the handle is not a collective in flight (waited for twice, or not "
                               "made by a *_start op)")
        ctx.flight = flight
        out, flight.forward = flight.forward.wait(), None  # the result is autograd's now, not the handle's
        return out

    @staticmethod
    def backward(ctx, g):
        ctx.flight.backward = ctx.flight.begin_backward(g.contiguous())
        return g.new_empty(0)


def _begun(kind: str, comm, begin):
    rank = current()  # backward may run on a thread that does not see it
    return lambda t: traced(begin(t), kind, comm, rank)


def _at_once(fn):
    def begin(t):
        out = fn(t)
        return Pending(lambda: out)

    return begin


@op("wait(Tensor handle) -> Tensor")
def wait(handle: torch.Tensor) -> torch.Tensor:
    """The result of the collective that ``handle`` (from a ``*_start`` op) began."""
    return _Wait.apply(handle)


@op("all_reduce_start(Tensor x, *, str group='tp') -> Tensor")
def all_reduce_start(x: torch.Tensor, *, group: str = "tp") -> torch.Tensor:
    """``all_reduce`` begun; ``wait`` gives the sum."""
    comm = current().comm(group)
    begin = _begun("all_reduce", comm, lambda t: comm.all_reduce_start(t.clone()))
    return _Start.apply(x, begin, lambda g: Pending(lambda: g))


@op("reduce_scatter_start(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def reduce_scatter_start(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """``reduce_scatter`` begun; ``wait`` gives this rank's shard of the sum."""
    comm = current().comm(group)
    layout = _layout(dim, size, runs, comm.world)
    begin = _begun("reduce_scatter", comm, lambda t: _reduce_scatter_start(t, layout, comm))
    return _Start.apply(x, begin, _begun("all_gather", comm, lambda g: scatter_grad_start(g, layout, comm)))


@op("all_gather_start(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def all_gather_start(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """``all_gather`` begun; ``wait`` gives the whole tensor."""
    comm = current().comm(group)
    layout = _layout(dim, size, runs, comm.world)
    begin = _begun("all_gather", comm, lambda t: gather_start(t, layout, comm))
    return _Start.apply(x, begin, _at_once(lambda g: own_slice_grad(g, layout, comm.rank)))


@op("gather_to_tp_start(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def gather_to_tp_start(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """``gather_to_tp`` begun; ``wait`` gives the whole tensor, and backward reduce-scatters its
    gradient in the background."""
    comm = current().comm(group)
    layout = _layout(dim, size, runs, comm.world)
    begin = _begun("all_gather", comm, lambda t: gather_start(t, layout, comm))
    return _Start.apply(x, begin, _begun("reduce_scatter", comm,
                                         lambda g: _reduce_scatter_start(g, layout, comm)))


SYNC = {  # each start op and the collective it begins
    all_reduce_start: C.all_reduce,
    reduce_scatter_start: C.reduce_scatter,
    all_gather_start: C.all_gather,
    gather_to_tp_start: C.gather_to_tp,
}
