"""The state passes share: what they plan for (the mesh and the user's options, frozen) and
the results they write.

Results are plain data keyed by original names (parameter and module names), so they can be
printed, saved, diffed and overridden.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .errors import OptionError
from .mesh import Mesh
from .options import PlanOptions
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


class Decision(str):
    """What the planner did with one splittable op (a matmul, an embedding): ``style`` is
    ``"colwise"``, ``"rowwise"``, ``"vocab"``, ``"replicate"`` or ``"follows input S(d)"``, and
    ``why`` the reason for a replicated one (``None`` where the style needs none). It is also its
    text, ``"replicate: why"``, so that it prints, compares and pattern-matches as written.

    >>> d = Decision("replicate", "user override")
    >>> d.style, d.why, d == "replicate: user override"
    ('replicate', 'user override', True)
    """

    style: str
    why: str | None

    def __new__(cls, style: str, why: str | None = None):
        self = super().__new__(cls, f"{style}: {why}" if why else style)
        self.style, self.why = style, why
        return self


@dataclass
class PlanContext:
    """The state passes share: what they plan for (the mesh, the user's ``options``, the names
    of the captured symbolic sizes), frozen, and the results they write, each a typed value.

    ``options`` is a ``PlanOptions`` (validated when built; passes never change it).
    ``group`` is the mesh dimension the placements of this plan are over: ``"tp"``, or ``"cp"``
    while the context-parallel steps of the pipeline split the sequence before tensor parallelism
    is planned.
    """

    mesh: Mesh
    options: PlanOptions = field(default_factory=PlanOptions)
    group: str = "tp"
    dim_names: dict = field(default_factory=dict)  # symbol -> the name given in dynamic_shapes
    # results, by the pass that writes them
    decisions: dict[str, Decision] = field(default_factory=dict)  # plan_sharding: module name -> decision
    param_placements: dict[str, Placement] = field(default_factory=dict)  # plan_sharding: weight -> placement
    replicated: list[Replicated] = field(default_factory=list)  # plan_sharding: fallbacks to whole weights
    sequence_split: dict[str, Placement] = field(default_factory=dict)  # sequence_parallel: node -> its split
    pipeline: object = None  # cut_stages: fxpar.stages.PipelineSpec
    # expert_parallel (ep > 1): stacked expert weights split over the ep ranks (by expert, dim 0),
    # and per weight of the experts ep rank 0 runs, the same weight of each ep rank
    expert_shards: dict[str, Placement] = field(default_factory=dict)
    expert_slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    expert_held: dict[str, tuple[str, int]] = field(default_factory=dict)  # each rank's weight -> (slot, ep rank)
    expert_layers: list[ExpertLayer] = field(default_factory=list)
    zero_rows: dict[str, int] = field(default_factory=dict)  # plan_weights: weight -> rows split over dp
    cast_weights: set[str] = field(default_factory=set)  # plan_weights: fp32 masters the layers read cast
    offloaded: set[str] = field(default_factory=set)  # plan_weights: weights whose masters live on the host
    recomputed: list[str] = field(default_factory=list)  # plan_recompute: regions backward recomputes
    warnings: list[str] = field(default_factory=list)  # any pass: what the user should know
    passes: list[str] = field(default_factory=list)  # run_pipeline: the passes that ran, in order

    def __post_init__(self):
        if not isinstance(self.options, PlanOptions):
            raise TypeError(f"PlanContext.options must be a PlanOptions, not {type(self.options).__name__}")
        if self.options.sequence_parallel and self.mesh.tp == 1:
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

    def holding(self):
        """How the ranks hold the weights (zero, fp32 masters): ``fxpar.memory.Holding``, for the
        memory model."""
        from .memory import Holding

        worlds = {t: self.zero_world(t) for t in self.zero_rows}
        return Holding(self.options.zero, self.mesh.dp, dict(self.zero_rows), frozenset(self.cast_weights),
                       frozenset(self.offloaded), worlds)

    def zero_group(self, target: str) -> str:
        """The ranks zero splits ``target`` over: its data-parallel replicas, which for a dense
        weight under expert parallelism are dp x ep (``"dp_ep"``: every ep rank holds it too) and
        for an expert's weight dp (``"dp"``)."""
        return "dp_ep" if self.mesh.ep > 1 and not self.is_expert(target) else "dp"

    def zero_world(self, target: str) -> int:
        """How many ranks zero splits ``target`` over (``zero_group``)."""
        return self.mesh.dp * (self.mesh.ep if self.zero_group(target) == "dp_ep" else 1)

    def zero_index(self, target: str, coord: dict) -> int:
        """The position of the rank at ``coord`` among those zero splits ``target`` over: its dp
        rank, or under ``"dp_ep"`` dp-major, ep-minor (as the communicator orders them)."""
        return coord["dp"] * self.mesh.ep + coord["ep"] if self.zero_group(target) == "dp_ep" else coord["dp"]

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
        for pattern, style in self.options.overrides.items():
            for name in names:
                if name and (fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")):
                    return style
        return None
