"""A batch as the schedule runner takes it, for ``ParallelModule`` and ``Plan`` alike: the captured
graph's flat inputs, split into microbatches (the target beside them), and a data-parallel
replica's part of a global batch."""

from __future__ import annotations

from torch.fx import _pytree as fx_pytree

from ..capture import Captured
from ..mesh import Mesh
from .pipeline import split_microbatches


def microbatches(cap: Captured, args, kwargs, m: int) -> list[list]:
    """The flat inputs of ``cap``'s graph for each of ``m`` microbatches of ``(args, kwargs)``."""
    return split_microbatches(flat_inputs(cap, args, kwargs), m)


def flat_inputs(cap: Captured, args, kwargs) -> list:
    """``(args, kwargs)`` as the captured graph's placeholders take them, in order."""
    return list(fx_pytree.tree_flatten_spec((args, kwargs), cap.gm._in_spec))


def target_microbatches(target, m: int) -> list | None:
    """``target`` split as ``microbatches`` splits the inputs (None without a target)."""
    return None if target is None else [t[0] for t in split_microbatches([target], m)]


def replica_part(flat: list, mesh: Mesh, rank: int) -> list:
    """The part of a global batch the replica of ``rank`` trains on (``Mesh.replica``)."""
    if mesh.replicas == 1:
        return flat
    return split_microbatches(flat, mesh.replicas, f"replicas of {mesh} (dp x ep)")[mesh.replica(rank)]
