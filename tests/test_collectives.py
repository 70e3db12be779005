"""Each collective computes what its placement change means, forward and backward, on threads
(the simulation) and on gloo processes, including non-contiguous inputs (gloo corrupts those)."""

import datetime

import pytest
import torch

from fxpar.placement import Shard
from fxpar.ops import collectives as C
from fxpar.ops.library import runs_arg
from fxpar.runtime.comm import DistComm
from fxpar.ops.context import RankContext, running
from fxpar.simulate import rank_contexts, run_ranks


def _global(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _local(t: torch.Tensor, layout: Shard, rank: int):
    return t.index_select(layout.dim, torch.as_tensor(layout.indices(rank)))


LAYOUTS = {
    "even": Shard.even(1, 8, 2),
    "segmented": Shard.segmented(1, 8, 2, (4,)),
}


def body(rank: int, world: int, layout_name: str):
    """Run every collective on this rank and check forward values and gradients."""
    layout = LAYOUTS[layout_name] if world == 2 else Shard.even(1, 8, world)
    runs = runs_arg(layout)
    full = _global(0, 3, 8)
    grad = _global(1, 3, 8)  # the gradient that reaches the output, the same on every rank
    per_rank = [_global(10 + r, 3, 8) for r in range(world)]
    out = {}

    # all_reduce: P -> R; gradient passes through
    x = per_rank[rank].clone().t().contiguous().t().requires_grad_()  # non-contiguous on purpose
    y = C.all_reduce(x)
    (y * grad).sum().backward()
    out["all_reduce"] = torch.allclose(y, sum(per_rank)) and torch.equal(x.grad, grad)

    # copy_to_tp: identity; gradient summed over ranks
    x = full.clone().requires_grad_()
    y = C.copy_to_tp(x)
    (y * per_rank[rank]).sum().backward()
    out["copy_to_tp"] = torch.equal(y, full) and torch.allclose(x.grad, sum(per_rank))

    # shard: R -> S; gradient gathered back to the whole tensor
    x = full.clone().requires_grad_()
    y = C.shard(x, layout.dim, layout.size, runs)
    (y * _local(grad, layout, rank)).sum().backward()
    out["shard"] = torch.equal(y, _local(full, layout, rank)) and torch.allclose(x.grad, grad)

    # all_gather: S -> R; gradient sliced
    x = _local(full, layout, rank).t().contiguous().t().requires_grad_()
    y = C.all_gather(x, layout.dim, layout.size, runs)
    (y * grad).sum().backward()
    out["all_gather"] = torch.equal(y, full) and torch.equal(x.grad, _local(grad, layout, rank))

    # reduce_scatter: P -> S; gradient gathered
    x = per_rank[rank].clone().requires_grad_()
    y = C.reduce_scatter(x, layout.dim, layout.size, runs)
    (y * _local(grad, layout, rank)).sum().backward()
    out["reduce_scatter"] = torch.allclose(y, _local(sum(per_rank), layout, rank)) and torch.allclose(x.grad, grad)

    # to_partial: R -> P; the sum over ranks is x; the gradient is the output's
    x = full.clone().requires_grad_()
    y = C.to_partial(x)
    (y * grad).sum().backward()
    out["to_partial"] = torch.equal(y, full if rank == 0 else torch.zeros_like(full)) and torch.equal(x.grad, grad)

    # shard into a layout where two ranks hold the same rows: their gradients add up
    if world == 2:
        dup = Shard(1, 8, (((0, 4),), ((0, 4),)))
        x = full.clone().requires_grad_()
        y = C.shard(x, 1, 8, runs_arg(dup))
        (y * per_rank[rank][:, :4]).sum().backward()
        expect = torch.zeros(3, 8)
        expect[:, :4] = per_rank[0][:, :4] + per_rank[1][:, :4]
        out["shard_duplicates"] = torch.allclose(x.grad, expect)
    return out


@pytest.mark.parametrize("world, layout", [(2, "even"), (2, "segmented"), (4, "even")])
def test_collectives_on_threads(world, layout):
    results = run_ranks(lambda r: body(r, world, layout), rank_contexts(world, 0, False))
    for r, res in enumerate(results):
        assert all(res.values()), f"rank {r}: {res}"


def _on_gloo(layout):
    import torch.distributed as dist

    comm = DistComm(dist.group.WORLD, datetime.timedelta(seconds=60))
    with running(RankContext(rank=comm.rank, comms={"tp": comm})):
        return body(comm.rank, comm.world, layout)


@pytest.mark.parametrize("layout", ["even", "segmented"])
def test_collectives_on_gloo(pools, layout):
    for r, res in enumerate(pools(2).run(_on_gloo, layout)):
        assert all(res.values()), f"rank {r}: {res}"
