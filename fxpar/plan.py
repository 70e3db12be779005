"""``fxpar.compile``: the whole plan for every rank, built with no process group.

A ``Plan`` can be printed (every value's placement, every collective's size), dumped to files
(every rank's generated code), run in this one process for all ranks (``simulate``,
``simulate_train``) and checked against the single-device model node by node (``check``).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.fx import _pytree as fx_pytree

from . import report
from .capture import Captured, capture
from .codegen import build_module, copy_graph, get_path, rank_graph
from .errors import DivergenceError, describe_node
from .holder import populate, retarget_submodules
from .mesh import Mesh, as_mesh
from .metadata import ORIGIN, PLACEMENT
from .pipeline import debug_level, run_pipeline
from .placement import REPLICATE, Shard
from .plan_context import PlanContext
from .simulate import Recorder, assemble, rank_contexts, run_ranks


def plan_graph(cap: Captured, mesh: Mesh, *, overrides=None, rng="megatron") -> tuple[GraphModule, PlanContext]:
    """Run the pass pipeline on a copy of the captured graph."""
    ctx = PlanContext(mesh=mesh, overrides=dict(overrides or {}), rng=rng)
    gm = GraphModule(cap.gm, copy_graph(cap.gm.graph)[0], class_name="GlobalPlan")
    gm = run_pipeline(gm, ctx)
    return gm, ctx


class Plan:
    """Every rank's program for one model, mesh and input signature (see ``fxpar.compile``)."""

    def __init__(self, model: nn.Module, mesh: Mesh, cap: Captured, gm: GraphModule, ctx: PlanContext, *, seed=0, init_fn=None):
        self.model = model
        self.mesh = mesh
        self.captured = cap
        self.graph_module = gm
        self.ctx = ctx
        self.seed = seed
        self.init_fn = init_fn
        self._ranks: dict[int, GraphModule] = {}
        self._holders: dict[int, nn.Module] = {}
        self._names: dict[str, str] = {}
        self._submods = retarget_submodules(cap.gm, torch.device("cpu"))

    @property
    def tp(self) -> int:
        return self.mesh.tp

    # per-rank programs ----------------------------------------------------------------------
    def rank_module(self, rank: int) -> GraphModule:
        """Rank ``rank``'s ``GraphModule`` on the CPU with its shards (built once, then reused)."""
        if not 0 <= rank < self.tp:
            raise IndexError(f"rank {rank} is outside tp={self.tp}")
        if rank not in self._ranks:
            holder = nn.Module()
            self._names = populate(
                holder, self.captured, self.ctx.param_placements, rank, self.model, "cpu", seed=self.seed, init_fn=self.init_fn
            )
            graph = rank_graph(self.graph_module, rank, torch.device("cpu"))
            self._holders[rank] = holder
            self._ranks[rank] = build_module(holder, graph, self.captured.gm, f"Rank{rank}", self._submods)
        return self._ranks[rank]

    def rank_code(self, rank: int) -> str:
        return self.rank_module(rank).code

    def param_names(self) -> dict[str, str]:
        """Graph attribute name -> user-facing parameter name (as ``model.named_parameters()``)."""
        self.rank_module(0)
        return dict(self._names)

    # running every rank here ----------------------------------------------------------------
    def simulate(self, *args, **kwargs):
        """Run all ranks in this process; return the output (the same structure as the model's)."""
        mods = [self.rank_module(r) for r in range(self.tp)]
        outs = run_ranks(lambda r: mods[r](*args, **kwargs), self._contexts())
        return outs[0]

    def simulate_train(self, loss_fn, *args, **kwargs):
        """Forward, ``loss_fn(output)`` and backward on all ranks.

        Returns ``(loss, grads)``: the loss and the full gradient of every parameter, re-assembled
        from the ranks' shards, keyed by the original parameter names. Gradients accumulate in the
        rank modules' ``.grad`` as in eager PyTorch; an optimizer can step on
        ``rank_module(r).parameters()``.
        """
        mods = [self.rank_module(r) for r in range(self.tp)]

        def step(r):
            loss = loss_fn(mods[r](*args, **kwargs))
            loss.backward()
            return loss.detach()

        losses = run_ranks(step, self._contexts())
        return losses[0], self.full_grads()

    def _contexts(self):
        return rank_contexts(self.tp, self.seed, self.ctx.rng == "exact")

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every parameter's gradient, re-assembled from the ranks, by original name."""
        for r in range(self.tp):
            self.rank_module(r)
        grads = {}
        for target, name in self.param_names().items():
            parts = [get_path(self._holders[r], target).grad for r in range(self.tp)]
            if any(p is None for p in parts):
                continue
            grads[name] = assemble(parts, self.ctx.param_placements.get(target, REPLICATE))
        return grads

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, re-assembled, under every original name."""
        for r in range(self.tp):
            self.rank_module(r)
        out = {}
        for key in self._holders[0].state_dict():
            parts = [self._holders[r].state_dict()[key] for r in range(self.tp)]
            place = self.ctx.param_placements.get(self.captured.graph_name(key), REPLICATE)
            out[key] = assemble(parts, place).clone()
        return out

    # checking against the single-device model ------------------------------------------------
    def check(self, *args, rtol: float = 1e-5, atol: float = 1e-5, loss_fn=None, **kwargs) -> int:
        """Run the single-device graph and all ranks; raise ``DivergenceError`` naming the first
        node whose re-assembled value differs (in graph order), and, with ``loss_fn(output) ->
        scalar``, the first node whose gradient differs (in the order backward reaches them).
        Returns the number of values compared."""
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
        """Write ``rank{r}.py`` (each rank's code), ``plan.txt`` (the table) and ``summary.txt``."""
        os.makedirs(path, exist_ok=True)
        written = []
        for r in range(self.tp):
            f = os.path.join(path, f"rank{r}.py")
            with open(f, "w") as fh:
                fh.write(report.rank_source(self.rank_module(r), r, self.graph_module))
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
) -> Plan:
    """Plan ``model`` for ``mesh`` with no process group.

    >>> from models import gpt
    >>> model, (idx,) = gpt.build()
    >>> plan = compile(model, Mesh(tp=2), (idx,))
    >>> torch.allclose(plan.simulate(idx), model(idx), atol=1e-5)
    True
    """
    mesh = as_mesh(mesh)
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    cap = capture(model, example_args, example_kwargs, dynamic_shapes=dynamic_shapes)
    gm, ctx = plan_graph(cap, mesh, overrides=overrides, rng=rng)
    plan = Plan(model, mesh, cap, gm, ctx, seed=seed, init_fn=init_fn)
    if debug_level() >= 3:
        import sys

        for r in range(mesh.tp):
            print(f"[fxpar] rank {r} code:\n{plan.rank_code(r)}", file=sys.stderr)
    return plan


