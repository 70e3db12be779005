"""A ``ParallelModule``'s programs, one per input signature (shapes that are not dynamic, dtypes,
train/eval mode, the ``torch.autocast`` around the call), made at the signature's first call as ``torch.compile`` recompiles: the checks
that every rank calls alike, capture and planning, and the ``RankProgram`` built from the plan.

The first program makes the parameters and fixes how they are placed (``geometry``); every later
one reuses them and must place them the same way.

Besides the model's forward, a module may have other entries: the same parameters under the same
names, run by another forward (generation's, against a key/value cache: ``fxpar/static_cache.py``).
An entry may add buffers of its own, made as zeros where a program first reads them.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .. import report
from ..autocast import autocast_of
from ..capture import capture
from ..codegen import get_path, has_path
from ..holder import set_path
from ..errors import CaptureError, FxparError
from ..geometry import ShardGeometry
from ..options import compute_dtype
from ..planning import first_microbatch, plan_graph
from ..placement import REPLICATE
from ..shards import shard_tensor
from .agree import agree, agree_on_failure
from .binding import Binding
from .checks import check_not_meta, explain_contents, explain_plan, explain_signature, input_summaries, plan_summary
from .rank import RankProgram


FORWARD = "forward"  # the model's own forward


class Programs:
    """The programs of the module ``root`` (where the first one registers the parameters) on the
    process ``bound``; ``options`` are the ``PlanOptions``, the rest what ``fxpar.parallelize``
    was given. ``plans`` lists ``(graph, PlanContext)`` of every program built."""

    def __init__(self, root, bound: Binding, everyone, *, skeleton, source, loss_fn, options, dynamic_shapes,
                 seed, init_fn, compile_options, check_mode, device):
        self.root, self.bound, self.everyone = root, bound, everyone
        self.skeleton, self.source, self.loss_fn = skeleton, source, loss_fn
        self.entries: dict[str, tuple] = {FORWARD: (skeleton, frozenset())}  # name -> (skeleton, its zero buffers)
        self.options, self.dynamic_shapes = options, dynamic_shapes
        self.seed, self.init_fn, self.compile_options = seed, init_fn, compile_options
        self.check_mode, self.device = check_mode, device
        self.loss_in_graph = dynamic_shapes is None
        self.programs: dict = {}
        self.plans: list = []
        self.geometry: ShardGeometry | None = None
        self.dynamic = None  # for the k-th tensor input, the dims captured as symbolic
        self.held = None  # the parameters this pipeline rank's stages hold
        # placements programs have settled, by graph name: the first program's for what it reads,
        # a later one's for a tensor no program read before it (a cache behind another input)
        self.settled: dict = {}

    @property
    def _pp_rank(self) -> int:
        return self.bound.mesh.coordinate(self.bound.rank)["pp"]

    def add_entry(self, name: str, skeleton, zeros=frozenset()) -> None:
        """Another forward of the module: ``skeleton`` (meta) holds the same parameters under the
        same names; ``zeros`` names the buffers it adds, made as zeros on each rank."""
        self.entries[name] = (skeleton, frozenset(zeros))

    def get(self, args, kwargs, training: bool, loss: bool = False, inputs: dict | None = None,
            entry: str = FORWARD) -> RankProgram:
        """The program for these inputs (their signature agreed by ``check_call``), built at the
        signature's first call. ``inputs``: the keyword inputs the ranks of a replica must agree
        on the values of (default ``kwargs``; a target besides)."""
        prog = self.programs.get((entry, loss, self._key(args, kwargs, training, entry)))
        if prog is None or self.check_mode == "always":
            self._check_contents(args, kwargs if inputs is None else inputs, entry)
        if prog is None:
            prog = self._build(args, kwargs, training, loss, entry)
            # keyed after building: the first capture tells which dims are symbolic
            self.programs[(entry, loss, self._key(args, kwargs, training, entry))] = prog
        return prog

    def loss_program(self, args, kwargs, training: bool) -> RankProgram | None:
        """The program computing model and loss as one graph, or None where the loss runs after
        the model's program (dynamic shapes, or a loss_fn that does not capture).

        Captured with the model, a cross-entropy over logits split by vocabulary runs split, and
        nothing only the loss reads (the logits) is gathered."""
        if not self.loss_in_graph:
            return None
        try:
            return self.get(args, kwargs, training, loss=True)
        except CaptureError as e:
            self.loss_in_graph = False
            warnings.warn(
                "fxpar: loss_fn could not be captured with the model, so it runs on the gathered outputs "
                f"instead (no vocabulary-parallel loss): {str(e).splitlines()[0]}",
                stacklevel=3,
            )
            return None

    def check_call(self, args, kwargs, training: bool, entry: str = FORWARD) -> None:
        """At every call, every rank agrees on the inputs' kinds (structure, shapes but for the
        dynamic sizes, dtypes, Python values) and on train/eval mode: a call whose program is new
        on one rank only would send that rank into checks its peers never join. One all-gather
        of 8 bytes; ``check_inputs="never"`` skips it."""
        check = self.check_mode != "never" and self.everyone.world > 1
        signature, contents = input_summaries(self.entries[entry][0].forward, args, kwargs, self._dynamic(entry),
                                              digests=False)
        if check:
            mode = "train" if training else "eval"
            extra = {} if entry == FORWARD else {"entry": entry}
            agree(self.everyone, {**signature, **extra, "mode": mode, "autocast": str(autocast_of(args, kwargs))},
                  explain_signature)
        check_not_meta(contents)

    def _check_contents(self, args, kwargs, entry: str = FORWARD) -> None:
        """The ranks of a replica agree on the values of the inputs."""
        mesh = self.bound.mesh
        if self.check_mode == "never" or self.everyone.world == 1 or mesh.size == mesh.replicas:
            return
        _, contents = input_summaries(self.entries[entry][0].forward, args, kwargs, self._dynamic(entry))
        agree(self.everyone, contents, explain_contents(self.bound.replica_of), self.bound.replica_of)

    def _dynamic(self, entry: str):
        """The symbolic dims of the model's forward's inputs (other entries take other inputs)."""
        return self.dynamic if entry == FORWARD else None

    def _key(self, args, kwargs, training: bool, entry: str = FORWARD):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        dyn = self._dynamic(entry) or {}
        parts, k = [], 0
        for x in leaves:
            if isinstance(x, torch.Tensor):
                shape = tuple(None if d in dyn.get(k, ()) else s for d, s in enumerate(x.shape))
                parts.append((shape, x.dtype))
                k += 1
            else:
                parts.append(x)
        return (training, autocast_of(args, kwargs), str(spec), tuple(parts))

    def _build(self, args, kwargs, training: bool, loss: bool, entry: str = FORWARD) -> RankProgram:
        first = self.geometry is None
        plan = lambda: self._plan(args, kwargs, training, loss, entry)  # noqa: E731
        cap, gm, ctx = agree_on_failure(self.everyone, plan, "to capture and plan the model")
        agree(self.everyone, plan_summary(ctx), explain_plan)
        own = frozenset().union(*(z for _, z in self.entries.values()))  # the entries' own buffers
        held = {p for s in ctx.pipeline.stages if s.rank == self._pp_rank for p in s.params} - own
        fresh = {}  # tensors no program read before, placed now
        if not first:
            first_ctx = self.geometry.ctx
            experts_moved = (ctx.expert_shards, ctx.expert_slots) != (first_ctx.expert_shards, first_ctx.expert_slots)
            fresh = {k: p for k, p in ctx.param_placements.items() if k not in self.settled and k not in own}
            moved = sorted(k for k, v in self.settled.items() if ctx.param_placements.get(k, REPLICATE) != v)
            if (held & self.settled.keys()) != (self.held & self.settled.keys()) or experts_moved or moved:
                raise FxparError(
                    "these inputs lead to a different placement of the parameters than the first call"
                    + (f" ({', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''})" if moved else "")
                    + "; parallelize a separate module for them"
                )
        for w in ctx.warnings:
            warnings.warn(f"fxpar: {w}", stacklevel=3)
        replicated = report.replication_warning(gm, ctx) if first else None
        if replicated:
            warnings.warn(f"fxpar: {replicated}", stacklevel=3)
        b = self.bound

        def build():
            self._place_fresh({k: p for k, p in fresh.items() if k in held}, cap)
            return RankProgram(
                self.root, cap, gm, ctx, b.mesh, b.rank, self.device, b.p2p,
                source=self.source, seed=self.seed, init_fn=self.init_fn, populate=first, to_global=b.to_global,
                compile_options=self.compile_options, zeros=self.entries[entry][1],
            )

        prog = agree_on_failure(self.everyone, build, "to build its shards and programs")
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        # parameters are settled by the first program, read or not: an optimizer may hold them
        self.settled.update((k, p) for k, p in ctx.param_placements.items()
                            if k not in own and (k in read or (first and _is_parameter(cap, k))))
        if not first:
            self.held |= held & fresh.keys()
        if first:
            self.geometry = ShardGeometry(cap, ctx, b.mesh)
            self.source = None  # the shards are made: the model's own tensors are not needed again
            self.dynamic = _dynamic_dims(cap) if entry == FORWARD else None
            self.held = held
            self._check_rng(gm)
        self.plans.append((gm, ctx))
        return prog

    def _place_fresh(self, fresh: dict, cap) -> None:
        """Buffers a later program is the first to read (the first one made them whole, as
        tensors forward never reads) take the placement it gives them: each rank cuts its part
        out of the whole it holds."""
        for target, place in fresh.items():
            if place == REPLICATE:
                continue
            names = cap.aliases.get(target, [target])
            if not has_path(self.root, names[0]):
                raise FxparError(
                    f"{names[0]} is read first by these inputs, on pipeline rank {self._pp_rank}, which does not "
                    "hold it: make the first call (or parallelize's example inputs) one that reads it"
                )
            local = shard_tensor(get_path(self.root, names[0]), place, self.bound.mesh.coordinate(self.bound.rank)["tp"])
            for name in names:
                set_path(self.root, name, local, persistent=cap.persistent.get(name, True))

    def _plan(self, args, kwargs, training: bool, loss: bool, entry: str = FORWARD):
        """Capture and plan on this rank alone (no communication): ``(captured, graph, ctx)``."""
        skeleton = self.entries[entry][0]
        skeleton.train(training)
        mb_args, mb_kwargs = first_microbatch(args, kwargs, self.options.microbatches)
        cap = capture(skeleton, mb_args, mb_kwargs, dynamic_shapes=self.dynamic_shapes,
                      loss_fn=self.loss_fn if loss else None, dtype=compute_dtype(self.options.precision),
                      autocast=autocast_of(args, kwargs))
        options = self.options
        if self.geometry is not None:  # the parameters stay as they are: split the same way, in the same stages
            first = self.geometry.ctx
            keep = {"fixed_weights": dict(self.settled)}
            if self.bound.mesh.pp > 1:
                spec = first.pipeline
                keep["param_stages"] = {p: list(spec.tied[p]) if p in spec.tied else s.index
                                        for s in spec.stages for p in s.params if p in self.settled}
            options = options.replace(**keep)
        gm, ctx = plan_graph(cap, self.bound.mesh, options)
        return cap, gm, ctx

    def _check_rng(self, gm) -> None:
        """Replicated dropout needs the same random state on every tp rank: warn if it is not."""
        from ..ops.local import dropout

        comm = self.bound.comms["tp"]
        if comm.world == 1 or not any(n.target is dropout and n.args[1] for n in gm.graph.nodes):
            return
        device = self.device
        gen = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
        digest = hashlib.sha1(gen.get_state().numpy().tobytes()).digest()[:8]
        mine = torch.tensor(list(digest), dtype=torch.int64, device=device)
        states = comm.exchange(mine)
        if any(not torch.equal(s, states[0]) for s in states):
            warnings.warn(
                "fxpar: tensor-parallel ranks have different random states, so dropout in replicated "
                "regions will draw different masks; call torch.manual_seed(same_seed) on every rank",
                stacklevel=4,
            )


def _is_parameter(cap, target: str) -> bool:
    names = cap.aliases.get(target) or [target]
    return isinstance(cap.tensors.get(names[0]), nn.Parameter)


def _dynamic_dims(cap) -> dict[int, tuple[int, ...]]:
    """For the k-th tensor input, the dims captured as symbolic."""
    out = {}
    tensors = [n.meta["val"] for n in cap.gm.graph.nodes
               if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    for k, v in enumerate(tensors):
        dims = tuple(d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt))
        if dims:
            out[k] = dims
    return out
