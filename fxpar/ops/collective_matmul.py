"""Collective matmuls: a sequence-parallel gather or reduce-scatter fused with the linears beside
it, so that the transfer runs while the rank computes the part that does not wait for it (the
async tensor parallelism of Megatron and of ``torch.distributed``'s fused all-gather matmul and
matmul reduce-scatter).

==========================  ==============================================  ===============================================
op                          forward                                         backward
==========================  ==============================================  ===============================================
``gathered_linears``        all-gather of the token shard begun; the        input re-gathered (if not kept) while the input
                            linears of this rank's own tokens run; then     gradient is computed; its reduce-scatter begun;
                            the other ranks' tokens                         the weight gradients computed meanwhile
``linear_reduce_scatter``   the other ranks' token rows first, their        gradient all-gather begun; this rank's rows'
                            partial sums sent (an all-to-all) while this    input and weight gradients computed meanwhile;
                            rank's own rows are computed                    then the other ranks' rows
==========================  ==============================================  ===============================================

Both compute the function of the unfused ops (``gather_to_tp`` then ``linear``; ``linear`` then
``reduce_scatter``) from the same bytes on the wire: the all-to-all of a reduce-scatter's
partial sums sends each rank its chunk, ``(t-1)/t`` of the tensor, as the ring reduce-scatter
does. What is hidden is the own part's compute, ``1/t`` of the matmul: at t=2 half the matmul
against the whole transfer. Each rank must hold the same number of tokens (every even split and
the zigzag layouts do); ``passes/collective_matmuls.py`` fuses only those. Under ``torch.compile``
they run the unfused collectives, for Dynamo to trace.

    >>> q, k, v = gathered_linears(x, 1, 4096, None, [wq, wk, wv], [None, None, None], True, group="tp")
    >>> out = linear_reduce_scatter(h, wo, None, 1, 4096, None, group="tp")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collectives import _assemble, _full_shape, _layout, _reduce_scatter, _take, reduce_scatter_start, scatter_grad_start
from .comm import Pending
from .context import current, traced
from .library import op


def _by_rank(own, others, rank: int, world: int) -> list:
    """Every rank's part, in rank order, from this rank's own and the others' (in rank order)."""
    it = iter(others)
    return [own if r == rank else next(it) for r in range(world)]


def _overlapped(comm, layout, x, overlap: bool) -> bool:
    """Whether this call computes its own part while the rest travels: the layout a partition of
    a token dim (not the features a linear contracts or makes), more than one rank, and not
    under Dynamo, which traces the plain collectives (a handle held across Python is not
    traceable). Otherwise the op runs the unfused ops' computation, in one node."""
    return (overlap and comm.world > 1 and layout.is_partition and 0 <= layout.dim < x.dim() - 1
            and not torch.compiler.is_compiling())


class _GatheredLinears(torch.autograd.Function):
    """``linear(gather(x), W_i, b_i)`` for every i, this rank's tokens computed while the others'
    arrive. ``keep``: autograd keeps the gathered input (as the unfused ops do) or only the shard
    ``x``, gathered again in backward (Megatron's sequence-parallel linear)."""

    @staticmethod
    def forward(ctx, x, layout, comm, keep, overlap, n, *wb):
        ws, bs = wb[:n], wb[n:]
        shape = _full_shape(x, layout.dim, layout.size)
        ctx.rank_ctx = current()
        if not overlap:
            full = _assemble(comm.all_gather(x.contiguous()), layout, shape)
            outs = tuple(F.linear(full, w, b) for w, b in zip(ws, bs))
        else:
            pending = traced(comm.all_gather_start(x.contiguous()), "all_gather", comm, ctx.rank_ctx)
            own = [F.linear(x, w, b) for w, b in zip(ws, bs)]  # overlaps the gather
            parts = pending.wait()
            others = [p for r, p in enumerate(parts) if r != comm.rank]
            outs = tuple(
                _assemble(_by_rank(o, [F.linear(p, w, b) for p in others], comm.rank, comm.world), layout,
                          _full_shape(o, layout.dim, layout.size))
                for o, w, b in zip(own, ws, bs)
            )
            full = _assemble(parts, layout, shape) if keep else None
        ctx.layout, ctx.comm, ctx.n, ctx.keep, ctx.overlap = layout, comm, n, keep, overlap
        ctx.has_bias = [b is not None for b in bs]
        ctx.save_for_backward(full if keep else x, *ws)
        return outs

    @staticmethod
    def backward(ctx, *gs):
        held, *ws = ctx.saved_tensors
        layout, comm, overlap = ctx.layout, ctx.comm, ctx.overlap
        again = None
        if not ctx.keep:  # gathered again, while the input gradient is computed
            again = comm.all_gather_start(held.contiguous()) if overlap else Pending(lambda: comm.all_gather(held.contiguous()))
            again = traced(again, "all_gather", comm, ctx.rank_ctx) if overlap else again
        gx = sum(g @ w for g, w in zip(gs, ws)).contiguous()
        full = held if ctx.keep else _assemble(again.wait(), layout, _full_shape(held, layout.dim, layout.size))
        scatter = traced(reduce_scatter_start(gx, layout, comm), "reduce_scatter", comm, ctx.rank_ctx) if overlap else None
        flat = full.reshape(-1, full.shape[-1])
        gws = [g.reshape(-1, g.shape[-1]).t() @ flat for g in gs]  # overlaps the reduce-scatter
        gbs = [g.reshape(-1, g.shape[-1]).sum(0) if hb else None for g, hb in zip(gs, ctx.has_bias)]
        gx = scatter.wait() if overlap else _reduce_scatter(gx, layout, comm)
        return (gx, None, None, None, None, None, *gws, *gbs)


@op(
    "gathered_linears(Tensor x, int dim, SymInt size, str? runs, Tensor[] weights, Tensor?[] biases, "
    "bool keep_gathered=False, bool overlap=True, *, str group='tp') -> Tensor[]"
)
def gathered_linears(x: torch.Tensor, dim: int, size: int, runs, weights, biases, keep_gathered: bool = False,
                     overlap: bool = True, *, group: str = "tp"):
    """``linear(gather_to_tp(x), w, b)`` for each weight and bias, as a tuple; this rank's own
    tokens are computed while the other ranks' travel. ``keep_gathered=False`` keeps only this
    rank's shard of the input for backward and gathers it again there (Megatron's
    sequence-parallel linear, ``recompute_gathers``): the activation memory of the gathered
    input divided by tp, for one more all-gather in backward, which overlaps the input
    gradient's matmul. ``overlap=False``: the gather waited for where it is."""
    comm = current().comm(group)
    layout = _layout(dim, size, runs, comm.world)
    overlap = _overlapped(comm, layout, x, overlap)
    return _GatheredLinears.apply(x, layout, comm, keep_gathered, overlap, len(weights), *weights, *biases)


class _LinearReduceScatter(torch.autograd.Function):
    """``reduce_scatter(linear(x, w) + to_partial(b))``, the other ranks' rows computed and sent
    first, this rank's own rows while they travel."""

    @staticmethod
    def forward(ctx, x, w, b, layout, comm, overlap):
        ctx.layout, ctx.comm, ctx.overlap, ctx.has_bias = layout, comm, overlap, b is not None
        ctx.rank_ctx = current()
        ctx.save_for_backward(x, w)
        me = comm.rank
        if not overlap:  # the unfused ops: the bias in rank 0's partial sum (``to_partial``)
            partial = F.linear(x, w, b if me == 0 else None)
            return _reduce_scatter(partial.contiguous(), layout, comm)
        else:
            first = F.linear(_take(x, layout, (me + 1) % comm.world), w)
            chunks = first.new_empty((comm.world, *first.shape))
            chunks[(me + 1) % comm.world] = first
            for r in range(comm.world):
                if r not in (me, (me + 1) % comm.world):
                    torch.matmul(_take(x, layout, r), w.t(), out=chunks[r])
            # this rank's slot is sent to itself only, and not read: its own rows are computed now
            pending = traced(comm.all_to_all_start(chunks, "reduce_scatter"), "reduce_scatter", comm, ctx.rank_ctx)
            own = F.linear(_take(x, layout, me), w)  # overlaps the all-to-all
            got = pending.wait()
            out = own if me == 0 else got[0].clone()
            for r in range(1, comm.world):  # summed in rank order, as the reduce-scatter sums
                out = out + (own if r == me else got[r])
        return out + b if b is not None else out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        layout, comm = ctx.layout, ctx.comm
        g = g.contiguous()
        if ctx.overlap:
            pending = traced(comm.all_gather_start(g), "all_gather", comm, ctx.rank_ctx)
            own = g @ w  # this rank's rows of the input gradient, while the others' arrive
            parts = pending.wait()
            rows = _by_rank(own, [p @ w for r, p in enumerate(parts) if r != comm.rank], comm.rank, comm.world)
            full_g = _assemble(parts, layout, _full_shape(g, layout.dim, layout.size))
            gx = _assemble(rows, layout, _full_shape(own, layout.dim, layout.size))
        else:
            full_g = scatter_grad_start(g, layout, comm).wait()
            gx = full_g @ w
        flat = full_g.reshape(-1, full_g.shape[-1])
        gw = flat.t() @ x.reshape(-1, x.shape[-1])
        gb = flat.sum(0) if ctx.has_bias else None
        return gx, gw, gb, None, None, None


@op("linear_reduce_scatter(Tensor x, Tensor weight, Tensor? bias, int dim, SymInt size, str? runs=None, "
    "bool overlap=True, *, str group='tp') -> Tensor")
def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, bias, dim: int, size: int, runs=None,
                          overlap: bool = True, *, group: str = "tp") -> torch.Tensor:
    """This rank's shard (along ``dim``) of ``linear(x, weight)`` summed over the ranks, plus
    ``bias`` (replicated, added once): a row-parallel linear followed by sequence parallelism's
    reduce-scatter, its own rows computed while the other ranks' partial sums travel."""
    comm = current().comm(group)
    layout = _layout(dim, size, runs, comm.world)
    return _LinearReduceScatter.apply(x, weight, bias, layout, comm, _overlapped(comm, layout, x, overlap))
