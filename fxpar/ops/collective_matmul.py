"""Collective matmuls: a sequence-parallel gather or reduce-scatter fused with the linears beside
it, so that the transfer runs while the rank computes the part that does not wait for it (the
looped collective matmul of Wang et al., as Megatron's and ``torch.distributed``'s async tensor
parallelism run it: ``all_gather_matmul``, ``matmul_reduce_scatter``).

Both go around the tp ranks in t steps (``Communicator.shift_start``: each rank sends to the next
and receives from the one before):

==========================  ==============================================  ===============================================
op                          forward                                         backward
==========================  ==============================================  ===============================================
``gathered_linears``        at each step the linears of the token chunk     the input gradient's chunks summed around the
                            held, while it goes on to the next rank         ring as they are computed (a reduce-scatter);
                            (an all-gather)                                 the input gathered again meanwhile (if not
                                                                            kept); then the weight gradients
``linear_reduce_scatter``   at each step the partial sum of one rank's      the output gradient's chunks passed around as
                            rows computed and added to the one received,    each one's rows of the input gradient are
                            then sent on (a reduce-scatter)                 computed (an all-gather); then the weight's
==========================  ==============================================  ===============================================

Both compute the function of the unfused ops (``gather_to_tp`` then ``linear``; ``linear`` then
``reduce_scatter``) from the same bytes on the wire: t-1 chunks, ``(t-1)/t`` of the tensor, as a
ring all-gather or reduce-scatter sends. Each step's transfer runs beside one chunk's matmul, so
what stays exposed is the part of each step's transfer that is longer than ``1/t`` of the matmul.
The own part comes first or last; partial sums are added in ring order, not rank order (fp32
rounding differs from the unfused ops, within a few ulps). A layout must split a token dim
(``passes/collective_matmuls.py`` fuses only those); where ranks share tokens, or under
``torch.compile`` (Dynamo traces the plain collectives), or with ``overlap=False``, the op runs
the unfused ops' computation.

    >>> q, k, v = gathered_linears(x, 1, 4096, None, [wq, wk, wv], [None, None, None], True, group="tp")
    >>> out = linear_reduce_scatter(h, wo, None, 1, 4096, None, group="tp")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collectives import _assemble, _full_shape, _layout, _reduce_scatter, _take, scatter_grad_start
from .comm import Pending
from .context import current, traced
from .library import op


def _overlapped(comm, layout, x, overlap: bool) -> bool:
    """Whether this call computes its own part while the rest travels: the layout a partition of
    a token dim (not the features a linear contracts or makes), more than one rank, and not
    under Dynamo, which traces the plain collectives (a handle held across Python is not
    traceable). Otherwise the op runs the unfused ops' computation, in one node."""
    return (overlap and comm.world > 1 and layout.is_partition and 0 <= layout.dim < x.dim() - 1
            and not torch.compiler.is_compiling())


class _Shifted:
    """A chunk on its way around the ring: ``wait()`` gives the one from the rank before."""

    def __init__(self, t, comm, kind: str, rank):
        self.shape = t.shape
        self.pending = traced(comm.shift_start(t.contiguous(), kind), kind, comm, rank)

    def wait(self):
        return self.pending.wait().view(self.shape)


def _ring_gather(x, comm, kind: str, rank, each):
    """Every rank's chunk of ``x`` passed around the ring, ``each(r, chunk)`` called on the
    chunk of rank r while it goes on to the next rank; returns the chunks in rank order."""
    chunks, held, src = [None] * comm.world, x, comm.rank
    for step in range(comm.world):
        coming = _Shifted(held, comm, kind, rank) if step + 1 < comm.world else None
        chunks[src] = held
        each(src, held)
        if coming is not None:
            held, src = coming.wait(), (src - 1) % comm.world
    return chunks


def _ring_reduce(comm, kind: str, rank, part):
    """This rank's chunk of a sum over the ranks whose part for rank r's chunk is ``part(r)``:
    each rank computes one chunk's part, adds the sum received and sends it on, the chunk's
    owner last."""
    me, w = comm.rank, comm.world
    acc = part((me - 1) % w)
    for step in range(1, w):
        coming = _Shifted(acc, comm, kind, rank)
        mine = part((me - 1 - step) % w)  # while the sum so far travels
        acc = coming.wait() + mine
    return acc


class _GatheredLinears(torch.autograd.Function):
    """``linear(gather(x), W_i, b_i)`` for every i, each chunk of tokens computed as it goes
    around the ring. ``keep``: autograd keeps the gathered input (as the unfused ops do) or only
    the shard ``x``, gathered again in backward (Megatron's sequence-parallel linear)."""

    @staticmethod
    def forward(ctx, x, layout, comm, keep, overlap, n, *wb):
        ws, bs = wb[:n], wb[n:]
        shape = _full_shape(x, layout.dim, layout.size)
        ctx.rank_ctx = current()
        if not overlap:
            full = _assemble(comm.all_gather(x.contiguous()), layout, shape)
            outs = tuple(F.linear(full, w, b) for w, b in zip(ws, bs))
        else:
            parts = [[None] * comm.world for _ in ws]

            def each(r, chunk):
                for i, (w, b) in enumerate(zip(ws, bs)):
                    parts[i][r] = F.linear(chunk, w, b)

            chunks = _ring_gather(x, comm, "all_gather", ctx.rank_ctx, each)
            outs = tuple(_assemble(p, layout, _full_shape(p[0], layout.dim, layout.size)) for p in parts)
            full = _assemble(chunks, layout, shape) if keep else None
        ctx.layout, ctx.comm, ctx.n, ctx.keep, ctx.overlap = layout, comm, n, keep, overlap
        ctx.has_bias = [b is not None for b in bs]
        ctx.save_for_backward(full if keep else x, *ws)
        return outs

    @staticmethod
    def backward(ctx, *gs):
        held, *ws = ctx.saved_tensors
        layout, comm, overlap = ctx.layout, ctx.comm, ctx.overlap
        again = None
        if not ctx.keep:  # the input gathered again, while the input gradient is computed
            again = (traced(comm.all_gather_start(held.contiguous()), "all_gather", comm, ctx.rank_ctx) if overlap
                     else Pending(lambda: comm.all_gather(held.contiguous())))
        if overlap:
            gs = [g.contiguous() for g in gs]
            gx = _ring_reduce(comm, "reduce_scatter", ctx.rank_ctx,
                              lambda r: sum(_take(g, layout, r) @ w for g, w in zip(gs, ws)))
        else:
            gx = _reduce_scatter(sum(g @ w for g, w in zip(gs, ws)).contiguous(), layout, comm)
        full = held if ctx.keep else _assemble(again.wait(), layout, _full_shape(held, layout.dim, layout.size))
        flat = full.reshape(-1, full.shape[-1])
        gws = [g.reshape(-1, g.shape[-1]).t() @ flat for g in gs]
        gbs = [g.reshape(-1, g.shape[-1]).sum(0) if hb else None for g, hb in zip(gs, ctx.has_bias)]
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
    """``reduce_scatter(linear(x, w) + to_partial(b))``, each rank's rows' partial sums computed
    and added as they go around the ring."""

    @staticmethod
    def forward(ctx, x, w, b, layout, comm, overlap):
        ctx.layout, ctx.comm, ctx.overlap, ctx.has_bias = layout, comm, overlap, b is not None
        ctx.rank_ctx = current()
        ctx.save_for_backward(x, w)
        if not overlap:  # the unfused ops: the bias in rank 0's partial sum (``to_partial``)
            partial = F.linear(x, w, b if comm.rank == 0 else None)
            return _reduce_scatter(partial.contiguous(), layout, comm)
        out = _ring_reduce(comm, "reduce_scatter", ctx.rank_ctx, lambda r: F.linear(_take(x, layout, r), w))
        return out + b if b is not None else out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        layout, comm = ctx.layout, ctx.comm
        g = g.contiguous()
        if ctx.overlap:
            rows = [None] * comm.world

            def each(r, chunk):
                rows[r] = chunk @ w  # rank r's rows of the input gradient, as its chunk passes

            parts = _ring_gather(g, comm, "all_gather", ctx.rank_ctx, each)
            full_g = _assemble(parts, layout, _full_shape(g, layout.dim, layout.size))
            gx = _assemble(rows, layout, _full_shape(rows[0], layout.dim, layout.size))
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
