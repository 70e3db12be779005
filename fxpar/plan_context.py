"""The state passes share: the mesh, the user's options, and the decisions passes make.

Decisions are plain data keyed by original names (parameter and module names), so they can be
printed, saved, diffed and overridden.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .errors import OptionError
from .mesh import Mesh
from .placement import Placement


@dataclass(frozen=True)
class ExpertLayer:
    """One mixture-of-experts layer under expert parallelism (``passes/expert_parallel.py``).

    ``name`` is its module, ``experts`` how many it has, ``form`` how they are written
    (``"grouped"``: stacked weights and grouped matmuls; ``"modules"``: one module per expert,
    looped over) and ``dispatch`` the graph node sending its tokens (find it in ``plan.dump``)."""

    name: str
    experts: int
    form: str
    dispatch: str
@dataclass(frozen=True)
class Replicated:
    """A weight kept whole on every tp rank although its op could split it: the planner's
    fallback, which costs ``numel`` elements on every rank beyond the 1/tp share.

    ``module`` and ``node`` name where it is used, ``source`` the user's line, ``why`` the
    reason (``plan_sharding``'s wording)."""

    weight: str
    numel: int
    module: str
    node: str
    source: str
    why: str


@dataclass
class PlanContext:
    """Options in, decisions out.

    ``overrides`` maps glob patterns over module or parameter names to a style:
    ``{"lm_head": "replicate", "*.attn.c_attn": "colwise"}``. ``rng`` is ``"megatron"`` (each tp
    rank draws its own dropout mask in sharded regions) or ``"exact"`` (the single-device masks,
    for checking).
    """

    mesh: Mesh
    # the mesh dimension the placements of this plan are over: "tp", or "cp" while
    # passes/context_parallel.py splits the sequence before tensor parallelism is planned
    group: str = "tp"
    overrides: dict[str, str] = field(default_factory=dict)
    rng: str = "megatron"
    device_type: str = "cpu"  # where the programs will run: memory estimates use its kernels
    optimizer: str = "adamw"  # for memory estimates: the states it keeps per parameter
    optimizer_dtype: object = None  # and their dtype (None: the parameter's)
    # pipeline: schedule by name, microbatches per step, stages per rank (interleaved), explicit
    # cuts by module name, a per-device memory cap in bytes, and values for symbolic sizes
    schedule: str = "1f1b"
    microbatches: int = 1
    virtual: int | None = None  # stages per rank, interleaved only (default 2)
    split_points: tuple = ()
    memory_limit: float | None = None
    sizes: dict = field(default_factory=dict)
    dim_names: dict = field(default_factory=dict)
    param_stages: dict = field(default_factory=dict)  # keep parameters in these stages (recapture)
    fixed_weights: dict = field(default_factory=dict)  # keep weights placed this way (recapture)
    # split the activations between tensor-parallel blocks along the sequence (Megatron SP)
    sequence_parallel: bool = False
    # keep the shard of each all-gathered column-parallel input for backward, gather it again there
    recompute_gathers: bool = False
    # written by passes
    decisions: dict[str, str] = field(default_factory=dict)  # module name -> "colwise" / "replicate: why" ...
    param_placements: dict[str, Placement] = field(default_factory=dict)  # parameter/buffer name -> placement
    sequence_split: dict[str, Placement] = field(default_factory=dict)  # node name -> its sequence split
    warnings: list[str] = field(default_factory=list)
    replicated: list[Replicated] = field(default_factory=list)  # fallbacks to whole weights, by plan_sharding
    pipeline: object = None  # fxpar.stages.PipelineSpec, written by cut_stages
    # written by expert_parallel (ep > 1): stacked expert weights split over the ep ranks (by
    # expert, dim 0), and per weight of the experts ep rank 0 runs, the same weight of each ep rank
    expert_shards: dict[str, Placement] = field(default_factory=dict)
    expert_slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    expert_held: dict[str, tuple[str, int]] = field(default_factory=dict)  # each rank's weight -> (slot, ep rank)
    expert_layers: list[ExpertLayer] = field(default_factory=list)

    def __post_init__(self):
        from .options import PlanOptions

        # one validation for every way of building a context: the options' own
        opts = PlanOptions(**{name: getattr(self, name) for name in PlanOptions.__dataclass_fields__})
        for name in PlanOptions.__dataclass_fields__:
            setattr(self, name, getattr(opts, name))
        if self.sequence_parallel and self.mesh.tp == 1:
            raise OptionError(
                "sequence_parallel=True splits the activations between tensor-parallel blocks over the tp ranks, "
                f"but {self.mesh} has tp=1: use a mesh with tp > 1 or drop sequence_parallel"
                + (" (cp already splits the whole sequence over its ranks)" if self.mesh.cp > 1 else "")
            )
        if self.mesh.ep > 1 and self.mesh.cp > 1:
            raise OptionError(
                f"{self.mesh}: expert parallelism splits the batch over the ep ranks and context parallelism the "
                "sequence over the cp ranks; both at once are not supported: use ep or cp, and tp inside either"
            )

    @property
    def world(self) -> int:
        """Ranks of the mesh dimension the placements are over (``group``)."""
        return getattr(self.mesh, self.group)

    @property
    def tp(self) -> int:
        return self.mesh.tp

    def held_target(self, target: str, ep_rank: int) -> str:
        """The weight ep rank ``ep_rank`` reads where the graph reads ``target`` (an expert's
        weight names the expert of that rank; every other weight is the same on all)."""
        slots = self.expert_slots.get(target)
        return target if slots is None else slots[ep_rank]

    def expert_slot(self, target: str) -> tuple[str, int] | None:
        """``(graph target, ep rank)`` of the weight of an expert module that one ep rank holds."""
        return self.expert_held.get(target)

    def is_expert(self, target: str) -> bool:
        """Whether ``target`` is a weight of experts split over the ep ranks."""
        return target in self.expert_shards or self.expert_slot(target) is not None

    def override_for(self, *names: str) -> str | None:
        """The style the user forced for a module/parameter known by any of ``names``."""
        for pattern, style in self.overrides.items():
            for name in names:
                if name and (fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")):
                    return style
        return None
