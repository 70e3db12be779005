"""Collectives as plain functions that generated per-rank code calls, each with the backward that
keeps autograd right (Megatron's conjugate pairs).

==================  ============================  =====================================
function            forward                       backward
==================  ============================  =====================================
``all_reduce``      P -> R: sum over ranks        identity (Megatron's ``g``)
``copy_to_tp``      identity                      all-reduce (Megatron's ``f``)
``all_gather``      S -> R                        keep own slice
``gather_to_tp``    S -> R                        reduce-scatter (Megatron's SP gather)
``shard``           R -> S: keep own slice        all-gather (sum over owners if shared)
``reduce_scatter``  P -> S                        all-gather (sum over owners if shared)
``redistribute``    S -> S' (other layout; an      S' -> S
                    all-to-all between even splits)
``to_partial``      R -> P: x on rank 0, else 0   identity
``shard_to_partial`` S -> P: own slice, 0 elsewhere  keep own slice
``pick_local``      S -> S' (each rank holds its   scatter into own slice
                    part of S' already)
``sum_duplicates``  identity (a weight stored in a    sum over the owners of each
                    layout where ranks share rows)    shared element
==================  ============================  =====================================

``dim`` is the sharded dimension; ``runs`` the layout of every rank as ``(start, stop)``
intervals (``None`` for an even split), the same on every rank so per-rank code stays alike.
Every tensor is made contiguous before it goes on the wire (gloo silently corrupts
non-contiguous all-reduces).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..placement import Shard
from .comm import Pending
from .context import current
from .library import op, parse_runs


@functools.lru_cache(maxsize=4096)
def _layout(dim: int, size: int, runs, world: int) -> Shard:
    return Shard.even(dim, size, world) if runs is None else Shard(dim, size, parse_runs(runs))


def _take(x: torch.Tensor, layout: Shard, rank: int) -> torch.Tensor:
    rr = layout.runs[rank]
    if len(rr) == 1:
        (a, b), = rr
        return x.narrow(layout.dim, a, b - a).contiguous()
    idx = torch.as_tensor(layout.indices(rank), device=x.device)
    return x.index_select(layout.dim, idx)


def _assemble(parts: list[torch.Tensor], layout: Shard, shape) -> torch.Tensor:
    if layout.is_even:
        return torch.cat(parts, layout.dim)
    out = parts[0].new_zeros(shape)
    for r, part in enumerate(parts):
        idx = torch.as_tensor(layout.indices(r), device=part.device)
        out.index_copy_(layout.dim, idx, part)
    return out


def _full_shape(x: torch.Tensor, dim: int, size: int):
    shape = list(x.shape)
    shape[dim] = size
    return shape


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_reduce(g), None


def _gather(x, layout, comm):
    parts = comm.all_gather(x)
    return _assemble(parts, layout, _full_shape(x, layout.dim, layout.size))


def _scatter_grad(g, layout, comm):
    """The whole gradient on every rank from each rank's gradient of its slice (gradients of an
    element several ranks hold are summed)."""
    if layout.is_partition:
        return _gather(g.contiguous(), layout, comm)
    full = g.new_zeros(_full_shape(g, layout.dim, layout.size))
    idx = torch.as_tensor(layout.indices(comm.rank), device=g.device)
    full.index_copy_(layout.dim, idx, g)
    return comm.all_reduce(full)


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return x.clone() if comm.rank == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        # the gradient of a partial sum is the same on every rank, and it is the gradient of x
        return g, None


def _primary_only(x, layout, rank):
    """``x`` (this rank's slice) with zeros where a lower rank holds the same element."""
    keep = torch.as_tensor(layout.primary(rank), device=x.device)
    shape = [1] * x.dim()
    shape[layout.dim] = -1
    return x * keep.view(shape).to(x.dtype)


class _ShardToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, comm):
        ctx.layout, ctx.comm = layout, comm
        full = x.new_zeros(_full_shape(x, layout.dim, layout.size))
        idx = torch.as_tensor(layout.indices(comm.rank), device=x.device)
        # an element several ranks hold goes into the sum once
        part = _primary_only(x, layout, comm.rank) if layout.has_duplicates else x
        return full.index_copy_(layout.dim, idx, part)

    @staticmethod
    def backward(ctx, g):
        # the gradient of a partial sum is whole on every rank: each keeps its slice
        return _take(g, ctx.layout, ctx.comm.rank), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, comm):
        ctx.layout, ctx.comm = layout, comm
        return _gather(x, layout, comm)

    @staticmethod
    def backward(ctx, g):
        return own_slice_grad(g, ctx.layout, ctx.comm.rank), None, None


def own_slice_grad(g, layout, rank):
    """``all_gather``'s backward: this rank's slice of the whole gradient."""
    local = _take(g, layout, rank)
    if layout.has_duplicates:
        # an element several ranks hold went into the whole tensor once: one of them gets its
        # gradient (the gradients of shared elements are summed over their owners upstream)
        local = _primary_only(local, layout, rank)
    return local


class _GatherToTP(_AllGather):
    """``_AllGather`` whose backward sums each rank's share of the gradient before slicing."""

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g.contiguous(), ctx.layout, ctx.comm), None, None


def _reduce_scatter(x, layout, comm):
    if layout.is_even:
        return comm.reduce_scatter(x, layout.dim)
    if layout.is_partition:
        # every rank's elements, rank after rank: an even reduce-scatter of that permutation
        order = torch.as_tensor(_rank_order(layout), device=x.device)
        return comm.reduce_scatter(x.index_select(layout.dim, order), layout.dim)
    return _take(comm.all_reduce(x), layout, comm.rank)


def reduce_scatter_start(x, layout, comm):
    """``_reduce_scatter`` begun (``Communicator.reduce_scatter_start``): the returned handle's
    ``wait()`` gives this rank's part."""
    if layout.is_even:
        return comm.reduce_scatter_start(x, layout.dim)
    if layout.is_partition:
        order = torch.as_tensor(_rank_order(layout), device=x.device)
        return comm.reduce_scatter_start(x.index_select(layout.dim, order).contiguous(), layout.dim)
    out = _reduce_scatter(x, layout, comm)
    return Pending(lambda: out)


def gather_start(x, layout, comm):
    """``_gather`` begun: the returned handle's ``wait()`` gives the whole tensor."""
    pending = comm.all_gather_start(x.contiguous())
    return Pending(lambda: _assemble(pending.wait(), layout, _full_shape(x, layout.dim, layout.size)))


def scatter_grad_start(g, layout, comm):
    """``_scatter_grad`` begun: the returned handle's ``wait()`` gives the whole gradient."""
    if layout.is_partition:
        return gather_start(g, layout, comm)
    out = _scatter_grad(g, layout, comm)
    return Pending(lambda: out)


@functools.lru_cache(maxsize=1024)
def _rank_order(layout: Shard):
    return np.concatenate([layout.indices(r) for r in range(layout.world)])


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, comm):
        ctx.layout, ctx.comm = layout, comm
        return _take(x, layout, comm.rank)

    @staticmethod
    def backward(ctx, g):
        return _scatter_grad(g, ctx.layout, ctx.comm), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, comm):
        ctx.layout, ctx.comm = layout, comm
        return _reduce_scatter(x, layout, comm)

    @staticmethod
    def backward(ctx, g):
        return _scatter_grad(g, ctx.layout, ctx.comm), None, None


@op("all_reduce(Tensor x, *, str group='tp') -> Tensor")
def all_reduce(x: torch.Tensor, *, group: str = "tp") -> torch.Tensor:
    """Sum of the partial tensors of all ranks (forward); gradient passes through unchanged."""
    return _AllReduce.apply(x, current().comm(group))


@op("copy_to_tp(Tensor(a) x, *, str group='tp') -> Tensor(a)")
def copy_to_tp(x: torch.Tensor, *, group: str = "tp") -> torch.Tensor:
    """Identity in forward; sums the gradient over ranks in backward.

    Marks a replicated value entering a sharded computation: each rank's backward only sees its
    own shard's contribution to the gradient.
    """
    return _CopyToTP.apply(x, current().comm(group))


@op("to_partial(Tensor x, *, str group='tp') -> Tensor")
def to_partial(x: torch.Tensor, *, group: str = "tp") -> torch.Tensor:
    """A replicated value as one rank's part of a partial sum (the others contribute zeros).

    Used for the bias of a row-parallel matmul, so that the bias is added once in the sum.
    """
    return _ToPartial.apply(x, current().comm(group))


@op("shard_to_partial(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def shard_to_partial(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """A shard as this rank's part of a partial sum: the whole shape, zeros outside the shard
    (no communication; an accumulator split like its input meeting a partial sum)."""
    comm = current().comm(group)
    return _ShardToPartial.apply(x, _layout(dim, size, runs, comm.world), comm)


class _SumDuplicates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, comm):
        ctx.layout, ctx.comm = layout, comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        shared, local_pos, global_pos = _shared_positions(ctx.layout, ctx.comm.rank)
        if not shared:
            return g, None, None
        dim = ctx.layout.dim
        buf = g.new_zeros(_full_shape(g, dim, shared))
        buf.index_copy_(dim, torch.as_tensor(global_pos, device=g.device),
                        g.index_select(dim, torch.as_tensor(local_pos, device=g.device)))
        summed = ctx.comm.all_reduce(buf).index_select(dim, torch.as_tensor(global_pos, device=g.device))
        return g.index_copy(dim, torch.as_tensor(local_pos, device=g.device), summed), None, None


@functools.lru_cache(maxsize=1024)
def _shared_positions(layout: Shard, rank: int):
    """``(count, local positions, positions among the shared)`` of the elements of ``rank``'s
    slice that other ranks hold too: only those need their gradients summed."""
    owners = np.zeros(layout.size, dtype=np.int64)
    for r in range(layout.world):
        owners[layout.indices(r)] += 1
    shared = np.flatnonzero(owners > 1)
    where = np.full(layout.size, -1, dtype=np.int64)
    where[shared] = np.arange(shared.size)
    mine = layout.indices(rank)
    local = np.flatnonzero(owners[mine] > 1)
    return int(shared.size), local, where[mine[local]]


def shared_count(layout: Shard) -> int:
    """How many elements along ``layout.dim`` more than one rank holds."""
    return _shared_positions(layout, 0)[0]


@op("sum_duplicates(Tensor(a) x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor(a)")
def sum_duplicates(x: torch.Tensor, dim: int, size: int, runs, *, group: str = "tp") -> torch.Tensor:
    """Identity in forward; in backward, the gradient of each element several ranks hold is summed
    over those ranks. Follows a weight stored so that ranks share rows (a fused q/k/v projection
    whose few key/value heads each serve several ranks): each owner's gradient is its own heads'
    share of the true one. Only the shared rows travel."""
    comm = current().comm(group)
    return _SumDuplicates.apply(x, _layout(dim, size, runs, comm.world), comm)


@op("all_gather(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def all_gather(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """The whole tensor from every rank's shard along ``dim`` (global extent ``size``)."""
    comm = current().comm(group)
    return _AllGather.apply(x, _layout(dim, size, runs, comm.world), comm)


@op("gather_to_tp(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def gather_to_tp(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """``all_gather`` of a value that a sharded computation consumes whole: each rank's backward
    sees only its own shard's share of the gradient, so the gradient is summed over the ranks and
    each keeps its slice (a reduce-scatter: half the bytes of ``copy_to_tp``'s all-reduce after
    an ``all_gather``). The gather at the input of a column-parallel block under sequence
    parallelism. Needs a layout in which every element has one owner."""
    comm = current().comm(group)
    return _GatherToTP.apply(x, _layout(dim, size, runs, comm.world), comm)


@op("shard(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def shard(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """This rank's shard of a replicated tensor (no communication in forward)."""
    comm = current().comm(group)
    return _Shard.apply(x, _layout(dim, size, runs, comm.world), comm)


@op("reduce_scatter(Tensor x, int dim, SymInt size, str? runs=None, *, str group='tp') -> Tensor")
def reduce_scatter(x: torch.Tensor, dim: int, size: int, runs=None, *, group: str = "tp") -> torch.Tensor:
    """This rank's shard of the sum of the partial tensors of all ranks."""
    comm = current().comm(group)
    return _ReduceScatter.apply(x, _layout(dim, size, runs, comm.world), comm)


class _PickLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, positions):
        ctx.dim, ctx.positions, ctx.size = dim, positions, x.shape[dim]
        return x.index_select(dim, positions)

    @staticmethod
    def backward(ctx, g):
        # the elements this rank did not pick get no gradient here: another owner picked them,
        # and a shared element's gradient is the sum over its owners
        full = g.new_zeros(_full_shape(g, ctx.dim, ctx.size))
        return full.index_copy_(ctx.dim, ctx.positions, g), None, None


@functools.lru_cache(maxsize=1024)
def _pick_positions(src: Shard, dst: Shard, rank: int) -> np.ndarray:
    if src.dim != dst.dim:  # src is whole along its dim: dst's dim is whole locally
        return dst.indices(rank)
    where = {int(g): i for i, g in enumerate(src.indices(rank))}
    return np.array([where[int(g)] for g in dst.indices(rank)], dtype=np.int64)


@op(
    "pick_local(Tensor x, int dim, SymInt size, str? runs, int dst_dim, SymInt dst_size, str? dst_runs, "
    "*, str group='tp') -> Tensor"
)
def pick_local(x: torch.Tensor, dim: int, size: int, runs, dst_dim: int, dst_size: int, dst_runs, *, group: str = "tp"):
    """Another layout of ``x`` whose every rank's part this rank holds already (the query heads'
    key/value heads out of all the repeats of a shared head, or out of a tensor every rank holds
    whole): a local pick, no communication."""
    comm = current().comm(group)
    src, dst = _layout(dim, size, runs, comm.world), _layout(dst_dim, dst_size, dst_runs, comm.world)
    positions = torch.as_tensor(_pick_positions(src, dst, comm.rank), device=x.device)
    return _PickLocal.apply(x, dst_dim, positions)


@op(
    "redistribute(Tensor x, int src_dim, SymInt src_size, str? src_runs, int dst_dim, SymInt dst_size, str? dst_runs, "
    "*, str group='tp') -> Tensor"
)
def redistribute(x, src_dim: int, src_size: int, src_runs, dst_dim: int, dst_size: int, dst_runs, *, group: str = "tp"):
    """Move from one shard layout to another: one all-to-all between even splits of two different
    dims (Ulysses' switch from sequence- to head-sharded), else all-gather and keep the new slice."""
    if src_runs is None and dst_runs is None and src_dim != dst_dim:
        return _AllToAll.apply(x, src_dim, dst_dim, current().comm(group))
    full = all_gather(x, src_dim, src_size, src_runs, group=group)
    return shard(full, dst_dim, dst_size, dst_runs, group=group)


def _all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, comm) -> torch.Tensor:
    """``x`` holds this rank's even slice of ``src_dim`` and all of ``dst_dim``; returns all of
    ``src_dim`` and this rank's even slice of ``dst_dim``."""
    chunks = torch.stack(x.chunk(comm.world, dst_dim))  # chunk i goes to rank i
    got = comm.all_to_all(chunks)  # chunk i came from rank i: its slice of src_dim
    return torch.cat(got.unbind(0), src_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_dim, dst_dim, comm):
        ctx.dims, ctx.comm = (src_dim, dst_dim), comm
        return _all_to_all(x, src_dim, dst_dim, comm)

    @staticmethod
    def backward(ctx, g):
        src_dim, dst_dim = ctx.dims
        return _all_to_all(g.contiguous(), dst_dim, src_dim, ctx.comm), None, None, None
