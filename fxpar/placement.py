"""How a tensor value is laid out over the ranks of one mesh dimension.

Three kinds, as in Megatron and DTensor:

* ``Replicate()`` — every rank holds the whole tensor.
* ``Partial()`` — every rank holds a tensor of the full shape; the value is their sum.
* ``Shard(dim, size, runs)`` — rank ``r`` holds the elements along ``dim`` whose global indices
  are listed, in local order, by ``runs[r]``, a tuple of half-open ``(start, stop)`` intervals.

An even split ``Shard.even(dim, size, world)`` gives rank ``r`` the interval
``[r*size/world, (r+1)*size/world)``. The explicit intervals describe the layouts a rewrite of
real models needs beyond that, with one type: a fused q/k/v projection whose output is split
afterwards (each rank owns a slice of each of the three segments), or key/value heads repeated
across ranks when there are fewer of them than ranks (two ranks own the same interval).

Placements are immutable and validated when built: every rank owns the same number of
elements, all inside ``[0, size)``.

>>> Shard.even(2, 8, 2)
S(2)
>>> Shard.segmented(1, 12, 2, bounds=(4, 8)).runs[1]
((2, 4), (6, 8), (10, 12))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


class Placement:
    """Base class of the three placements."""

    def is_shard(self, dim: int | None = None) -> bool:
        return False

    def is_replicate(self) -> bool:
        return False

    def is_partial(self) -> bool:
        return False


@dataclass(frozen=True)
class Replicate(Placement):
    def is_replicate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial(Placement):
    """Each rank holds a summand of the value (the output of a row-parallel matmul)."""

    def is_partial(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "P"


Run = tuple[int, int]


@dataclass(frozen=True)
class Shard(Placement):
    dim: int
    size: int
    runs: tuple[tuple[Run, ...], ...]

    def __post_init__(self):
        if self.dim < 0:
            raise ValueError(f"Shard dim must be non-negative, got {self.dim}")
        if not self.runs:
            raise ValueError("Shard needs the runs of at least one rank")
        counts = {sum(b - a for a, b in rank_runs) for rank_runs in self.runs}
        if len(counts) != 1:
            raise ValueError(f"every rank must own the same number of elements, got {sorted(counts)} in {self.runs}")
        for rank_runs in self.runs:
            for a, b in rank_runs:
                if not 0 <= a < b <= self.size:
                    raise ValueError(f"run ({a}, {b}) is outside [0, {self.size}) in {self.runs}")

    # construction --------------------------------------------------------------------------
    @staticmethod
    def even(dim: int, size: int, world: int) -> Shard:
        """Contiguous equal chunks, rank order (``torch.chunk`` of a divisible size)."""
        if size % world:
            raise ValueError(f"size {size} is not divisible by {world} ranks")
        n = size // world
        return Shard(dim, size, tuple(((r * n, (r + 1) * n),) for r in range(world)))

    @staticmethod
    def segmented(dim: int, size: int, world: int, bounds: tuple[int, ...]) -> Shard:
        """Split ``[0, size)`` at ``bounds`` into segments and each segment evenly over the ranks.

        A fused projection whose output is later cut at ``bounds`` needs this layout so that every
        piece is itself evenly sharded.
        """
        edges = [0, *sorted(set(b for b in bounds if 0 < b < size)), size]
        runs = [[] for _ in range(world)]
        for a, b in zip(edges, edges[1:]):
            if (b - a) % world:
                raise ValueError(f"segment [{a}, {b}) of size {b - a} is not divisible by {world} ranks")
            n = (b - a) // world
            for r in range(world):
                runs[r].append((a + r * n, a + (r + 1) * n))
        return Shard(dim, size, tuple(_merge(rr) for rr in runs))

    @staticmethod
    def from_indices(dim: int, size: int, indices) -> Shard:
        """Build from one array of global indices per rank, in local order."""
        return Shard(dim, size, tuple(_runs_of(np.asarray(ix)) for ix in indices))

    # queries -------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return len(self.runs)

    @cached_property
    def local_size(self) -> int:
        return sum(b - a for a, b in self.runs[0])

    def indices(self, rank: int) -> np.ndarray:
        """Global indices owned by ``rank`` in local order."""
        return np.concatenate([np.arange(a, b) for a, b in self.runs[rank]])

    @cached_property
    def is_even(self) -> bool:
        return self == Shard.even(self.dim, self.size, self.world) if self.size % self.world == 0 else False

    @cached_property
    def _owners(self) -> np.ndarray:
        """How many ranks own each element."""
        count = np.zeros(self.size, dtype=np.int64)
        for r in range(self.world):
            np.add.at(count, self.indices(r), 1)
        return count

    @cached_property
    def has_duplicates(self) -> bool:
        """True when some element is owned by more than one rank."""
        return bool((self._owners > 1).any())

    @cached_property
    def covers_all(self) -> bool:
        """True when every element is owned by some rank."""
        return bool((self._owners > 0).all())

    @cached_property
    def is_partition(self) -> bool:
        """Every element owned by exactly one rank: sums over the ranks count each element once."""
        return bool((self._owners == 1).all())

    @cached_property
    def is_whole(self) -> bool:
        """Every rank holds every element (a split that is whole on each rank: a piece of a split
        tensor that all ranks need, such as the one key/value head of multi-query attention)."""
        return bool((self._owners == self.world).all())

    def primary(self, rank: int) -> np.ndarray:
        """Mask over ``rank``'s local elements: True where ``rank`` is the lowest rank owning it."""
        first = np.full(self.size, -1, dtype=np.int64)
        for r in reversed(range(self.world)):
            first[self.indices(r)] = r
        return first[self.indices(rank)] == rank

    def is_shard(self, dim: int | None = None) -> bool:
        return dim is None or self.dim == dim

    def with_dim(self, dim: int) -> Shard:
        return Shard(dim, self.size, self.runs)

    def segment_starts(self) -> tuple[int, ...]:
        """Interior segment edges of a ``segmented`` layout (rank 0's runs start at each edge)."""
        return tuple(a for a, _ in self.runs[0] if a > 0)

    def __repr__(self) -> str:
        if self.is_even:
            return f"S({self.dim})"
        return f"S({self.dim}){self.describe_layout()}"

    def describe_layout(self) -> str:
        if self.has_duplicates:
            return f"[x{int(self._owners.max())} dup]"
        if not self.covers_all:
            return "[partial cover]"
        if all(len(r) == len(self.runs[0]) > 1 for r in self.runs):
            return f"[{len(self.runs[0])} seg]"
        return "[" + " ".join(",".join(f"{a}:{b}" for a, b in rr) for rr in self.runs) + "]"


def _merge(runs: list[Run]) -> tuple[Run, ...]:
    out: list[list[int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _runs_of(ix: np.ndarray) -> tuple[Run, ...]:
    if ix.size == 0:
        return ()
    breaks = np.nonzero(np.diff(ix) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [ix.size]])
    return tuple((int(ix[s]), int(ix[e - 1]) + 1) for s, e in zip(starts, stops))


REPLICATE = Replicate()
PARTIAL = Partial()
