"""The process grid: named dimensions, tensor parallelism innermost, context parallelism next to it,
expert parallelism outside both.

A ``Mesh`` is a plain description (``Mesh(dp=2, tp=4)``) that planning and simulation use with no
process group at all. ``Mesh.bind()`` turns it into torch's own ``DeviceMesh`` over the current
``torch.distributed`` world when a program really runs; a ``DeviceMesh`` built by the user with
``mesh_dim_names`` is accepted wherever a ``Mesh`` is.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MeshError
from .options import timeout as as_timeout

# Outermost first. tp is innermost because it communicates most (CONTEXT: 3D meshes); cp next,
# its all-to-alls around every attention being the next most frequent; ep's two all-to-alls per
# mixture-of-experts layer next.
DIM_ORDER = ("dp", "pp", "ep", "cp", "tp")
# dimensions that exist on every mesh only in name when 1: left out of the repr
_QUIET = ("ep", "cp")

_BOUND: dict = {}


@dataclass(frozen=True, kw_only=True)  # by name only: Mesh(2) would read as whichever dim comes first
class Mesh:
    """A grid of ``dp * pp * ep * cp * tp`` ranks described by named dimensions: data, pipeline,
    expert (each rank holds ``1/ep`` of every mixture-of-experts layer's experts and is a
    data-parallel replica for the rest of the model), context (the sequence split over ranks for
    every layer) and tensor parallelism.

    >>> Mesh(tp=2).size
    2
    >>> Mesh(dp=2, tp=2).coordinate(3)
    {'dp': 1, 'pp': 0, 'ep': 0, 'cp': 0, 'tp': 1}
    """

    dp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self):
        for name in DIM_ORDER:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MeshError(f"Mesh({name}={value!r}): every dimension must be a positive int")

    @property
    def replicas(self) -> int:
        """Ranks that each train on their own part of the batch: the dp replicas, each split over ep."""
        return self.dp * self.ep

    def replica(self, rank: int) -> int:
        """Which part of the batch (of ``replicas``) global ``rank`` trains on, dp-major."""
        c = self.coordinate(rank)
        return c["dp"] * self.ep + c["ep"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in DIM_ORDER)

    @property
    def size(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out

    def coordinate(self, rank: int) -> dict[str, int]:
        """The position of global ``rank`` on each named dimension (row-major, tp fastest)."""
        if not 0 <= rank < self.size:
            raise MeshError(f"rank {rank} is outside {self} of {self.size} ranks")
        coord = {}
        for name, extent in reversed(list(zip(DIM_ORDER, self.shape))):
            coord[name] = rank % extent
            rank //= extent
        return {n: coord[n] for n in DIM_ORDER}

    def rank_of(self, **coord) -> int:
        """The global rank at a coordinate (missing dimensions are 0): ``rank_of(pp=1, tp=0)``."""
        r = 0
        for name, extent in zip(DIM_ORDER, self.shape):
            r = r * extent + coord.get(name, 0)
        return r

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{n}={getattr(self, n)}" for n in DIM_ORDER if n not in _QUIET or getattr(self, n) > 1) + ")"

    # binding ----------------------------------------------------------------------------
    def bind(self, device_type: str | None = None, timeout: datetime.timedelta | None = None):
        """Torch's ``DeviceMesh`` for this grid over the current world.

        Initializes the default process group from torchrun's environment when it is not yet
        initialized (NCCL when CUDA is available, gloo otherwise), with ``timeout`` (default
        ``$FXPAR_TIMEOUT`` seconds, else 300).
        """
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        ensure_process_group(device_type, timeout)
        world = dist.get_world_size()
        if world != self.size:
            raise MeshError(
                f"{self} has {self.size} ranks but the torch.distributed world has {world}; "
                f"launch {self.size} processes or change the mesh so that dp*pp*ep*cp*tp == {world}"
            )
        from torch.distributed.device_mesh import init_device_mesh

        # one DeviceMesh (and its process groups) per grid and world, however many modules use it
        key = (device_type, self.shape, id(dist.group.WORLD))
        if key not in _BOUND:
            _BOUND[key] = init_device_mesh(device_type, self.shape, mesh_dim_names=DIM_ORDER)
        return _BOUND[key]


def as_mesh(mesh) -> Mesh:
    """Accept a ``Mesh`` or a torch ``DeviceMesh`` with ``mesh_dim_names``."""
    if isinstance(mesh, Mesh):
        return mesh
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None and hasattr(mesh, "mesh"):
        raise MeshError(
            "a DeviceMesh passed to fxpar needs mesh_dim_names, e.g. "
            "init_device_mesh('cuda', (2, 4), mesh_dim_names=('dp', 'tp'))"
        )
    if names is None:
        raise MeshError(f"expected fxpar.Mesh or torch DeviceMesh, got {type(mesh).__name__}")
    unknown = [n for n in names if n not in DIM_ORDER]
    if unknown:
        raise MeshError(f"DeviceMesh dimension names {unknown} are not among {DIM_ORDER}")
    order = [DIM_ORDER.index(n) for n in names]
    if order != sorted(order):
        raise MeshError(f"DeviceMesh dimensions {tuple(names)} must be ordered as {DIM_ORDER} (tp innermost)")
    return Mesh(**dict(zip(names, mesh.mesh.shape)))


def ensure_process_group(device_type: str, timeout: datetime.timedelta | None = None) -> None:
    """Initialize the default process group from torchrun's environment, unless it is.

    Under torchrun's restarts (``--max-restarts``) the workers of every attempt share the
    agent's store, where the previous attempt's addresses are still written; a worker that reads
    one connects to a process that is gone and fails (pytorch/pytorch#135712). Each attempt
    therefore rendezvous under a prefix of its own."""
    if dist.is_initialized():
        return
    timeout = as_timeout(timeout)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise MeshError(
            "torch.distributed is not initialized: launch with `torchrun --nproc-per-node N` or call "
            "torch.distributed.init_process_group(...) before fxpar.parallelize"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    store = dist.PrefixStore(f"fxpar/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
