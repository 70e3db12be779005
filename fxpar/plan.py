"""``fxpar.compile``: the whole plan for every rank, built with no process group.

A ``Plan`` can be printed (every value's placement, every collective's size), dumped to files
(every rank's generated code), run in this one process for all ranks (``simulate``,
``simulate_train``) and checked against the single-device model node by node (``check``, in
``fxpar/plan_check.py``); its memory queries are in ``fxpar/plan_memory.py``, and where each
rank's shards lie in its ``geometry`` (``fxpar/geometry.py``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from . import plan_check, plan_memory, report
from .autocast import autocast_of
from .capture import TARGET, Captured, capture
from .codegen import get_path
from .errors import FxparError
from .geometry import ShardGeometry
from .holder import retarget_submodules
from .mesh import Mesh, as_mesh
from .pipeline import debug_level
from .planning import check_overrides, first_microbatch, plan_graph  # noqa: F401 - also importable from here
from .options import PlanOptions, compute_dtype
from .plan_context import PlanContext
from .runtime import telemetry
from .runtime.batches import flat_inputs, replica_part, target_microbatches
from .runtime.checks import check_not_meta, input_summaries
from .runtime.p2p import ThreadP2P
from .runtime.pipeline import join_microbatches, microbatch_size, split_microbatches
from .runtime.rank import RankProgram
from .simulate import mesh_contexts, run_ranks


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
        self.geometry = ShardGeometry(cap, ctx, mesh)  # which rank holds which box of each tensor
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
        if prog.full is not None:
            return report.rank_source(prog.full, rank, self.graph_module, self.mesh)
        return "\n\n".join(report.rank_source(prog.stages[j], rank, self.graph_module, self.mesh, j)
                             for j in sorted(prog.stages))

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
        flat = flat_inputs(self.captured, args, kwargs)
        m = self.ctx.options.microbatches
        mbs = [split_microbatches(replica_part(flat, self.mesh, r), m) for r in range(self.mesh.size)]
        outs = run_ranks(lambda r: progs[r].runner.forward(mbs[r]), self._contexts(), self._p2p())
        last = self.ctx.pipeline.stages[-1].rank
        # each replica's microbatches, in batch order
        spec = self.captured.gm._out_spec
        ep = self.mesh.ep
        firsts = [self.mesh.rank_of(dp=q // ep, ep=q % ep, pp=last) for q in range(self.mesh.replicas)]
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
                raise FxparError("this plan computes the loss it was compiled with; pass loss_fn=None or the same "
                                 "function")
            kwargs, target, loss_fn = {**kwargs, TARGET: target}, None, None
        if not self.pipelined:
            def step(r):
                out = progs[r].full(*args, **kwargs)
                loss = out if self.loss_fn is not None else (loss_fn(out) if target is None else loss_fn(out, target))
                loss.backward()
                return loss.detach()
        else:
            flat = flat_inputs(self.captured, args, kwargs)
            m = self.ctx.options.microbatches
            chunks = [replica_part(flat, self.mesh, r) for r in range(self.mesh.size)]
            targets = [None if target is None else target_microbatches(replica_part([target], self.mesh, r)[0], m)
                       for r in range(self.mesh.size)]

            def step(r):
                mbs = split_microbatches(chunks[r], m)
                return progs[r].runner.train_step(mbs, targets[r], loss_fn, progs[r].params)
        losses = run_ranks(step, self._contexts(), self._p2p())
        return losses[0], self.full_grads()

    def save_trace(self, path: str) -> None:
        """The last simulated step of every rank as a Chrome trace (see ``ParallelModule.save_trace``)."""
        telemetry.write_chrome_trace(path, [e for r, p in sorted(self._programs.items())
                                            for e in telemetry.rank_events(r, p)])

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

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient, re-assembled from the ranks, by original name."""
        grads = {}
        for target, name in self.param_names().items():
            g = self.geometry.full(name, lambda r: get_path(self._holders[r], target).grad)
            if g is not None:
                grads[name] = g
        return grads

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, re-assembled, under every original name."""
        for r in range(self.mesh.size):
            self.program(r)
        states = [self._holders[r].state_dict() for r in range(self.mesh.size)]
        out = {}
        for held in states:
            for key in held:
                if key not in out:
                    out[key] = self.geometry.full(key, lambda r: states[r][key]).clone()
        return out

    # experts --------------------------------------------------------------------------------
    def routed_tokens(self) -> dict[str, list[list[int]]]:
        """Per mixture-of-experts layer, for each ep rank, the rows (routed token slots) each of
        its experts got in the last simulated step (its last microbatch, dp replica 0); empty
        before any step or without expert parallelism."""
        return telemetry.routed_by_ep_rank(self._last_contexts or [], self.mesh, self.ctx.expert_layers)

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
        return plan_memory.stage_memory(self.ctx, sizes)

    def device_memory(self, **sizes) -> list:
        """Per pipeline rank, what it holds for all its stages (see ``fxpar.memory.per_device``)."""
        return plan_memory.device_memory(self.ctx, sizes)

    def max_microbatch(self, limit: float, dim: str = "batch", **sizes) -> int:
        """The largest microbatch (size of the symbolic dimension ``dim``) with which every device
        fits ``limit`` bytes; 0 if none does. Needs ``dim`` captured as symbolic
        (``dynamic_shapes={"x": {0: "batch"}}``)."""
        return plan_memory.max_microbatch(self.ctx, limit, dim, sizes)

    def max_cache(self, limit: float, **sizes) -> int:
        """The most positions the model's key/value cache can hold (its length, for the batch it
        was set up for) with every device within ``limit`` bytes: weights and the program's own
        memory as planned, the cache the rest (``fxpar/plan_memory.py``).

        >>> model.setup_caches(max_batch_size=8, max_seq_len=128)          # doctest: +SKIP
        >>> plan = fxpar.compile(model, fxpar.Mesh(tp=8), (tokens, torch.arange(T)))  # doctest: +SKIP
        >>> plan.max_cache(80 << 30)     # positions for 8 sequences in 80 GiB  # doctest: +SKIP
        """
        return plan_memory.max_cache(self.ctx, limit, sizes)

    def estimate(self, device="h100-80gb", gpus_per_node: int = 8):
        """How long one optimizer step of this plan takes on ``device`` (``fxpar/cost.py``)."""
        from .cost import estimate_plan

        return estimate_plan(self, device, gpus_per_node)

    # checking against the single-device model ------------------------------------------------
    def check(self, *args, rtol: float = 1e-5, atol: float = 1e-5, loss_fn=None, **kwargs) -> int:
        """Run the single-device graph and all ranks; raise ``DivergenceError`` naming the first
        node whose re-assembled value differs (in graph order), and, with ``loss_fn(output) ->
        scalar``, the first node whose gradient differs (in the order backward reaches them).
        Returns the number of values compared."""
        return plan_check.check(self, args, kwargs, rtol, atol, loss_fn)

    # reports ----------------------------------------------------------------------------------
    def table(self) -> str:
        """Every node with its placement, local shape and collective sizes."""
        return report.plan_table(self.graph_module, self.ctx)

    def summary(self) -> str:
        return report.summary(self.graph_module, self.ctx)

    def dump(self, path: str) -> list[str]:
        """Write ``rank{r}.py`` for every distinct program (a rank's code: its whole program, or
        its pipeline stages), headed by the ranks that run it: data-parallel replicas run the
        same code, and so do other ranks whose code reads the same (one file, named after the
        first); ``plan.txt`` (the node table) and ``summary.txt`` (decisions, collectives,
        stages with their memory, the schedule)."""
        os.makedirs(path, exist_ok=True)
        written = []
        programs: dict[str, list[int]] = {}  # code below its title -> the ranks (of dp rank 0) running it
        titles: dict[str, str] = {}
        for r in range(self.mesh.size):
            if self.mesh.coordinate(r)["dp"]:
                continue
            title, _, body = self.rank_code(r).partition("\n")
            programs.setdefault(body, []).append(r)
            titles.setdefault(body, title)
        for body, ranks in programs.items():
            served = sorted(self.mesh.rank_of(**{**self.mesh.coordinate(r), "dp": d}) for r in ranks
                            for d in range(self.mesh.dp))
            f = os.path.join(path, f"rank{ranks[0]}.py")
            runs = "" if len(served) == 1 else f"\n# the same program runs on {len(served)} ranks: {_spans(served)}"
            with open(f, "w") as fh:
                fh.write(titles[body] + runs + "\n" + body)
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

    ``options`` shape the pipeline: ``schedule`` (``"1f1b"``, ``"gpipe"``, ``"interleaved"``, and
    the zero-bubble ``"zbh1"`` and ``"zbv"``, whose backward runs as input-gradient and deferred
    weight-gradient parts: ``passes/split_backward.py``), ``microbatches``, ``virtual`` (stages
    per rank when interleaved), ``split_points`` (module
    names to cut before, instead of cutting by memory), ``memory_limit`` (bytes per device),
    ``optimizer`` (``"adamw"``, ``"adam"``, ``"sgd"``, ``"sgd_momentum"``, ``"none"``: whose
    states the memory estimate counts) with ``optimizer_dtype`` (their dtype, default the
    parameters'), and ``sizes`` (values of symbolic sizes to plan for). The example inputs are a
    whole batch: the graph is captured for one microbatch of one data-parallel replica. Called
    under ``torch.autocast``, the plan computes in the dtypes eager autocast computes in, with or
    without autocast around its runs (``fxpar/autocast.py``).

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
    cap = capture(model, mb_args, mb_kwargs, dynamic_shapes=dynamic_shapes, loss_fn=loss_fn,
                  dtype=compute_dtype(opts.precision), autocast=autocast_of(example_args, example_kwargs))
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


def _spans(ranks: list[int]) -> str:
    """``0-3, 8-11``: sorted ranks as runs."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _real(forward, args, kwargs, what: str) -> None:
    """Running needs values: a meta-device input is named (the model may be planned on meta)."""
    check_not_meta(input_summaries(forward, args, kwargs, None, digests=False)[1], f"plan.{what}: ")
