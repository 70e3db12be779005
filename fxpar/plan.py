"""``fxpar.compile``: the whole plan for every rank, built with no process group.

A ``Plan`` can be printed (every value's placement, every collective's size), dumped to files
(every rank's generated code), run in this one process for all ranks (``simulate``,
``simulate_train``) and checked against the single-device model node by node (``check``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from . import report
from .capture import TARGET, Captured, capture
from .codegen import build_module, get_path, rank_graph
from .errors import DivergenceError, FxparError, describe_node
from .holder import populate, retarget_submodules
from .memory import per_device
from .mesh import Mesh, as_mesh
from .metadata import GRAD_PARTIAL, ORIGIN, PLACEMENT
from .pipeline import debug_level
from .planning import check_overrides, first_microbatch, plan_graph  # noqa: F401 - also importable from here
from .placement import PARTIAL, REPLICATE, Shard
from .options import PlanOptions
from .plan_context import PlanContext
from .ops import collectives as C
from .runtime.checks import check_not_meta, input_summaries
from .runtime.p2p import ThreadP2P
from .runtime.pipeline import join_microbatches, microbatch_size, split_microbatches
from .runtime.rank import RankProgram
from .simulate import Recorder, assemble, mesh_contexts, run_ranks


class Plan:
    """Every rank's program for one model, mesh and input signature (see ``fxpar.compile``)."""

    def __init__(self, model: nn.Module, mesh: Mesh, cap: Captured, gm: GraphModule, ctx: PlanContext, *, seed=0,
                 init_fn=None, loss_fn=None):
        self.model = model
        self.loss_fn = loss_fn  # when given, the graph computes the loss (its output)
        self.mesh = mesh
        self.captured = cap
        self.graph_module = gm
        self.ctx = ctx
        self.seed = seed
        self.init_fn = init_fn
        self._programs: dict[int, RankProgram] = {}
        self._holders: dict[int, nn.Module] = {}
        self._contexts_p2p = None
        self._last_contexts = None
        self._submods = retarget_submodules(cap.gm, torch.device("cpu"))

    @property
    def tp(self) -> int:
        return self.mesh.tp

    @property
    def pipelined(self) -> bool:
        """Whether training goes through the schedule runner (stages, microbatches, replicas)."""
        return self.mesh.pp > 1 or self.mesh.replicas > 1 or self.ctx.options.microbatches > 1

    # per-rank programs ----------------------------------------------------------------------
    def program(self, rank: int) -> RankProgram:
        """Everything global rank ``rank`` runs, on the CPU with its own shards (built once)."""
        if not 0 <= rank < self.mesh.size:
            raise IndexError(f"rank {rank} is outside {self.mesh}")
        if rank not in self._programs:
            holder = nn.Module()
            self._programs[rank] = RankProgram(
                holder, self.captured, self.graph_module, self.ctx, self.mesh, rank, torch.device("cpu"),
                self._p2p().endpoint(rank), source=self.model, seed=self.seed, init_fn=self.init_fn,
            )
            self._holders[rank] = holder
        return self._programs[rank]

    def rank_module(self, rank: int) -> GraphModule:
        """Rank ``rank``'s whole-model ``GraphModule`` (one pipeline stage), holding its shards."""
        prog = self.program(rank)
        if prog.full is None:
            raise FxparError(f"{self.mesh} cuts the model into stages: use stage_module(stage, rank)")
        return prog.full

    def stage_module(self, stage: int, rank: int | None = None) -> GraphModule:
        """The program of pipeline ``stage`` on the global ``rank`` holding it (default: tp rank 0, dp 0)."""
        if rank is None:
            rank = self.mesh.rank_of(pp=self.ctx.pipeline.stages[stage].rank)
        return self.program(rank).stages[stage]

    def rank_code(self, rank: int) -> str:
        """Rank ``rank``'s program as a listing (``fxpar/listing.py``): what ``dump`` writes to
        ``rank{rank}.py``. ``rank_module(rank).code`` is the code that runs."""
        prog = self.program(rank)
        mods = [prog.full] if prog.full is not None else [prog.stages[j] for j in sorted(prog.stages)]
        return "\n\n".join(report.rank_source(m, rank, self.graph_module, self.mesh) for m in mods)

    def param_names(self) -> dict[str, str]:
        """Graph attribute name -> user-facing parameter name (as ``model.named_parameters()``)."""
        names = {}
        for r in range(self.mesh.size):
            names.update(self.program(r).names)
        return names

    # running every rank here ----------------------------------------------------------------
    def simulate(self, *args, **kwargs):
        """Run all ranks in this process; return the output (the same structure as the model's)."""
        _real(self.model.forward, args, kwargs, "simulate")
        progs = [self.program(r) for r in range(self.mesh.size)]
        if not self.pipelined:
            outs = run_ranks(lambda r: progs[r].full(*args, **kwargs), self._contexts(), self._p2p())
            return outs[0]
        flat = list(fx_pytree.tree_flatten_spec((args, kwargs), self.captured.gm._in_spec))
        m = self.ctx.options.microbatches
        mbs = [split_microbatches(_replica(flat, self.mesh, r), m) for r in range(self.mesh.size)]
        outs = run_ranks(lambda r: progs[r].runner.forward(mbs[r]), self._contexts(), self._p2p())
        last = self.ctx.pipeline.stages[-1].rank
        # each replica's microbatches, in batch order
        spec = self.captured.gm._out_spec
        firsts = [self.mesh.rank_of(dp=q // self.mesh.ep, ep=q % self.mesh.ep, pp=last) for q in range(self.mesh.replicas)]
        parts = [pytree.tree_unflatten(o, spec) for r in firsts for o in outs[r]]
        return join_microbatches(parts, microbatch_size(mbs[0]))

    def simulate_train(self, loss_fn, *args, target=None, **kwargs):
        """Forward, ``loss_fn(output)`` (or ``loss_fn(output, target)``) and backward on all ranks,
        through the pipeline schedule when there is one.

        Returns ``(loss, grads)``: the (mean over microbatches) loss and the full gradient of every
        parameter, re-assembled from the ranks' shards and stages, keyed by the original parameter
        names. Gradients accumulate in the ranks' ``.grad`` as in eager PyTorch; an optimizer can
        step on ``program(r).params`` (or ``rank_module(r).parameters()``).
        """
        _real(self.model.forward, args, {**kwargs, "target": target}, "simulate_train")
        progs = [self.program(r) for r in range(self.mesh.size)]
        if self.loss_fn is not None:  # the graph takes the target and returns the loss
            if loss_fn not in (None, self.loss_fn):
                raise FxparError("this plan computes the loss it was compiled with; pass loss_fn=None or the same function")
            kwargs, target, loss_fn = {**kwargs, TARGET: target}, None, None
        if not self.pipelined:
            def step(r):
                out = progs[r].full(*args, **kwargs)
                loss = out if self.loss_fn is not None else (loss_fn(out) if target is None else loss_fn(out, target))
                loss.backward()
                return loss.detach()
        else:
            flat = fx_pytree.tree_flatten_spec((args, kwargs), self.captured.gm._in_spec)
            m = self.ctx.options.microbatches
            chunks = [_replica(list(flat), self.mesh, r) for r in range(self.mesh.size)]
            targets = [None if target is None else split_microbatches([_replica([target], self.mesh, r)[0]], m) for r in range(self.mesh.size)]

            def step(r):
                mbs = split_microbatches(chunks[r], m)
                tg = None if targets[r] is None else [t[0] for t in targets[r]]
                return progs[r].runner.train_step(mbs, tg, loss_fn, progs[r].params)
        losses = run_ranks(step, self._contexts(), self._p2p())
        return losses[0], self.full_grads()

    def save_trace(self, path: str) -> None:
        """The last simulated step of every rank as a Chrome trace (see ``ParallelModule.save_trace``)."""
        from .runtime.module import write_chrome_trace

        write_chrome_trace(path, [(r, n, a, b) for r, p in sorted(self._programs.items()) for n, a, b in p.runner.events])

    def optimizer_params(self) -> list[list]:
        """Per global rank, the parameters an optimizer of that rank steps."""
        return [list(self.program(r).params.values()) if self.pipelined else list(self.rank_module(r).parameters())
                for r in range(self.mesh.size)]

    def _p2p(self):
        if self._contexts_p2p is None:
            self._contexts_p2p = ThreadP2P()
        return self._contexts_p2p

    def _contexts(self):
        contexts, _ = mesh_contexts(self.mesh, self.seed, self.ctx.options.rng == "exact")
        self._last_contexts = contexts
        return contexts

    def _holders_of(self, target: str, ep: int = 0) -> list[int]:
        """Global ranks (of dp replica 0, ep rank ``ep``) holding ``target`` (as the graph names
        it): the tp ranks of its first stage."""
        for r in range(self.mesh.size):
            self.program(r)
        stage_rank = min(s.rank for s in self.ctx.pipeline.stages if target in s.params) if any(
            target in s.params for s in self.ctx.pipeline.stages) else 0
        return [self.mesh.rank_of(pp=stage_rank, ep=ep, tp=t) for t in range(self.tp)]

    def _full(self, target: str, value):
        """The whole tensor ``target`` from ``value(holder, name)`` of every rank holding part of
        it: the tp parts, and for experts split over ep the ep ranks' experts; None if a rank has none."""
        slot = self.ctx.expert_slot(target)
        read, owner = slot if slot is not None else (target, 0)
        over_ep = self.ctx.expert_shards.get(target)
        pieces = []
        for e in range(self.mesh.ep) if over_ep is not None else [owner]:
            parts = [value(self._holders[r], target) for r in self._holders_of(read, e)]
            if any(p is None for p in parts):
                return None
            pieces.append(assemble(parts, self.ctx.param_placements.get(read, REPLICATE)))
        return pieces[0] if over_ep is None else assemble(pieces, over_ep)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient, re-assembled from the ranks, by original name."""
        grads = {}
        for target, name in self.param_names().items():
            g = self._full(target, lambda holder, t: get_path(holder, t).grad)
            if g is not None:
                grads[name] = g
        return grads

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, re-assembled, under every original name."""
        for r in range(self.mesh.size):
            self.program(r)
        out = {}
        for r in range(self.mesh.size):
            for key in self._holders[r].state_dict():
                if key not in out:
                    target = self.captured.graph_name(key)
                    out[key] = self._full(target, lambda holder, t: holder.state_dict()[key]).clone()
        return out

    # experts --------------------------------------------------------------------------------
    def routed_tokens(self) -> dict[str, list[list[int]]]:
        """Per mixture-of-experts layer, for each ep rank, the rows (routed token slots) each of
        its experts got in the last simulated step (its last microbatch, dp replica 0); empty
        before any step or without expert parallelism."""
        contexts = self._last_contexts or []
        out: dict = {}
        for layer in self.ctx.expert_layers:
            per_rank = [None] * self.mesh.ep
            for r, c in enumerate(contexts):
                coord = self.mesh.coordinate(r)
                if coord["dp"] == 0 and coord["tp"] == 0 and layer.name in c.routed:
                    per_rank[coord["ep"]] = list(c.routed[layer.name])
            if all(p is not None for p in per_rank):
                out[layer.name] = per_rank
        return out

    def expert_report(self) -> str:
        """A table: per mixture-of-experts layer and ep rank, the experts it holds and the rows
        each got in the last simulated step (``routed_tokens``)."""
        if not self.ctx.expert_layers:
            return "no experts split over ep ranks (the mesh has ep=1 or the model no mixture-of-experts layer)"
        return report.expert_report(self.routed_tokens(), self.ctx.expert_layers, self.mesh)

    # memory --------------------------------------------------------------------------------
    def memory(self, **sizes) -> list:
        """Per pipeline stage, the estimated bytes one rank holds (``StageMemory``: parameters,
        gradients, optimizer state, activations of the microbatches in flight, ``peak``) at the
        given sizes of the symbolic dimensions (``plan.memory(batch=4, seq=2048)``; by default the
        sizes the plan was made for)."""
        spec = self.ctx.pipeline
        values = {**spec.sizes, **sizes}
        return [s.memory.at(values, self.ctx.dim_names) for s in spec.stages]

    def device_memory(self, **sizes) -> list:
        """Per pipeline rank, what it holds for all its stages (see ``fxpar.memory.per_device``)."""
        return per_device(self.memory(**sizes), [s.rank for s in self.ctx.pipeline.stages])

    def max_microbatch(self, limit: float, dim: str = "batch", **sizes) -> int:
        """The largest microbatch (size of the symbolic dimension ``dim``) with which every device
        fits ``limit`` bytes; 0 if none does. Needs ``dim`` captured as symbolic
        (``dynamic_shapes={"x": {0: "batch"}}``)."""
        if dim not in self.ctx.dim_names.values():
            raise FxparError(f"no symbolic dimension named {dim!r}: capture it with dynamic_shapes (named {dim!r})")
        fits = lambda b: max(m.peak for m in self.device_memory(**{**sizes, dim: b})) <= limit  # noqa: E731
        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi) and hi < 1 << 30:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # checking against the single-device model ------------------------------------------------
    def check(self, *args, rtol: float = 1e-5, atol: float = 1e-5, loss_fn=None, **kwargs) -> int:
        """Run the single-device graph and all ranks; raise ``DivergenceError`` naming the first
        node whose re-assembled value differs (in graph order), and, with ``loss_fn(output) ->
        scalar``, the first node whose gradient differs (in the order backward reaches them).
        Returns the number of values compared."""
        if self.mesh.pp > 1 or self.mesh.dp > 1:
            raise FxparError("check compares tensor-parallel plans node by node; for pipelines compare simulate_train's loss and gradients")
        if self.mesh.ep > 1:
            raise FxparError(
                "check compares tensor-parallel plans node by node, but with ep > 1 each rank runs its part of the batch "
                "and its own experts: compare simulate / simulate_train with the model instead"
            )
        if self.mesh.cp > 1:
            raise FxparError(
                "check compares tensor-parallel plans node by node, but with cp > 1 the graph is one cp rank's program "
                "(a slice of the sequence): compare simulate / simulate_train with the model instead"
            )
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.captured.gm._in_spec)
        grads = loss_fn is not None
        rng_state = torch.default_generator.get_state()
        ref = Recorder(self._reference_module(), grads)
        out = ref.run_model(*flat)
        if grads:
            loss_fn(out).backward()
        torch.default_generator.set_state(rng_state)  # the ranks draw what the reference drew
        mods = [self.rank_module(r) for r in range(self.tp)]

        def record(r):
            rec = Recorder(mods[r], grads)
            result = rec.run_model(*flat)
            if not grads:
                return rec.values, {}
            loss_fn(result).backward()
            found = {k: g.clone() for k, g in rec.gradients().items()}
            mods[r].zero_grad()  # checking leaves no gradients behind for training
            return rec.values, found

        ranks = run_ranks(record, self._contexts())
        nodes = [n for n in self.graph_module.graph.nodes if n.meta.get(ORIGIN) is not None and n.op != "output"]
        compared = self._compare(nodes, ref.values, [v for v, _ in ranks], rtol, atol, "value")
        if grads:
            compared += self._compare(reversed(nodes), ref.gradients(), [g for _, g in ranks], rtol, atol, "gradient")
        return compared

    def _compare(self, nodes, expected, per_rank, rtol, atol, what: str) -> int:
        compared = 0
        for node in nodes:
            expect = expected.get(node.meta[ORIGIN])
            if not isinstance(expect, torch.Tensor) or not expect.is_floating_point():
                continue
            place = node.meta.get(PLACEMENT)
            grad = what == "gradient"
            parts = [v.get(node.name) for v in per_rank]
            if any(p is None for p in parts):
                raise DivergenceError(f"some ranks have no {what} for {describe_node(node)}")
            if grad and node.meta.get(GRAD_PARTIAL):
                place = PARTIAL  # each rank's part of the gradient, until the all-reduce above it
                grad = False  # summed as a value is
            elif grad and any(u.target is C.sum_duplicates for u in node.users):
                grad = False  # rows several ranks hold: each holds their summed gradient already
            whole = place == REPLICATE or (grad and not isinstance(place, Shard))
            if whole and any(not torch.equal(p, parts[0]) for p in parts[1:]):
                raise DivergenceError(
                    f"the ranks disagree on the {what} of replicated {describe_node(node)}\n"
                    f"  every rank should hold the same tensor here"
                )
            got = assemble(parts, place, grad=grad)
            compared += 1
            if got.shape != expect.shape or not torch.allclose(got, expect, rtol=rtol, atol=atol):
                diff = (got - expect).abs().max().item() if got.shape == expect.shape else float("nan")
                raise DivergenceError(
                    f"the plan's {what}s first diverge from the single-device model at {describe_node(node)}\n"
                    f"  placement {place}, max |difference| {diff:.3g} (rtol={rtol}, atol={atol})"
                )
        return compared

    def _reference_module(self) -> GraphModule:
        holder = nn.Module()
        populate(holder, self.captured, {}, 0, self.model, "cpu", seed=self.seed, init_fn=self.init_fn)
        return build_module(holder, rank_graph(self.captured.gm, 0, torch.device("cpu")), self.captured.gm, "Reference", self._submods)

    # reports ----------------------------------------------------------------------------------
    def table(self) -> str:
        """Every node with its placement, local shape and collective sizes."""
        return report.plan_table(self.graph_module, self.ctx)

    def summary(self) -> str:
        return report.summary(self.graph_module, self.ctx)

    def dump(self, path: str) -> list[str]:
        """Write ``rank{r}.py`` (each rank's code: its whole program, or its pipeline stages),
        ``plan.txt`` (the node table) and ``summary.txt`` (decisions, collectives, stages with
        their memory, the schedule)."""
        os.makedirs(path, exist_ok=True)
        written = []
        for r in range(self.mesh.size):
            f = os.path.join(path, f"rank{r}.py")
            with open(f, "w") as fh:
                fh.write(self.rank_code(r))
            written.append(f)
        for name, text in (("plan.txt", self.table()), ("summary.txt", self.summary())):
            f = os.path.join(path, name)
            with open(f, "w") as fh:
                fh.write(text + "\n")
            written.append(f)
        return written

    def __repr__(self) -> str:
        return f"Plan({type(self.model).__name__}, {self.mesh}, {len(self.graph_module.graph.nodes)} nodes)"


def compile(
    model: nn.Module,
    mesh,
    example_args=(),
    example_kwargs=None,
    *,
    dynamic_shapes=None,
    overrides=None,
    rng: str = "megatron",
    seed: int = 0,
    init_fn=None,
    loss_fn=None,
    example_target=None,
    **options,
) -> Plan:
    """Plan ``model`` for ``mesh`` with no process group.

    ``options`` shape the pipeline: ``schedule`` (``"1f1b"``, ``"gpipe"``, ``"interleaved"``),
    ``microbatches``, ``virtual`` (stages per rank when interleaved), ``split_points`` (module
    names to cut before, instead of cutting by memory), ``memory_limit`` (bytes per device),
    ``optimizer`` (``"adamw"``, ``"adam"``, ``"sgd"``, ``"sgd_momentum"``, ``"none"``: whose
    states the memory estimate counts) with ``optimizer_dtype`` (their dtype, default the
    parameters'), and ``sizes`` (values of symbolic sizes to plan for). The example inputs are a whole batch: the graph is captured for one
    microbatch of one data-parallel replica.

    >>> from fxpar.models import gpt
    >>> model, (idx,) = gpt.build()
    >>> plan = compile(model, Mesh(tp=2), (idx,))
    >>> torch.allclose(plan.simulate(idx), model(idx), atol=1e-5)
    True
    """
    mesh = as_mesh(mesh)
    opts = PlanOptions.from_user("fxpar.compile()", overrides=overrides or {}, rng=rng, **options)
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    if loss_fn is not None:
        example_kwargs = {**(example_kwargs or {}), TARGET: example_target}
    mb_args, mb_kwargs = first_microbatch(example_args, example_kwargs, opts.microbatches, mesh.replicas)
    cap = capture(model, mb_args, mb_kwargs, dynamic_shapes=dynamic_shapes, loss_fn=loss_fn)
    gm, ctx = plan_graph(cap, mesh, opts)
    replicated = report.replication_warning(gm, ctx)
    if replicated:
        warnings.warn(f"fxpar: {replicated}", stacklevel=2)
    plan = Plan(model, mesh, cap, gm, ctx, seed=seed, init_fn=init_fn, loss_fn=loss_fn)
    if debug_level() >= 3:
        import sys

        for r in range(mesh.size):
            print(f"[fxpar] rank {r} code:\n{plan.rank_code(r)}", file=sys.stderr)
    return plan


def _real(forward, args, kwargs, what: str) -> None:
    """Running needs values: a meta-device input is named (the model may be planned on meta)."""
    check_not_meta(input_summaries(forward, args, kwargs, None, digests=False)[1], f"plan.{what}: ")


def _replica(flat: list, mesh: Mesh, rank: int) -> list:
    """The part of a global batch the replica of ``rank`` trains on (``Mesh.replica``)."""
    if mesh.replicas == 1:
        return flat
    return split_microbatches(flat, mesh.replicas, f"replicas of {mesh} (dp x ep)")[mesh.replica(rank)]
