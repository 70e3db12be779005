"""``fxpar.autoplan``: which mesh and options to train a model with on ``world_size`` devices.

The search, in two rounds:

1. **Screen.** For each tensor-parallel degree that divides the attention heads (read off the
   graph: the query and key/value heads of every attention op) and fits a node, the model is
   planned once for one sample, with and without full recomputation (``recompute="full"``). Those
   plans' step-time estimates and memory (``fxpar/cost.py``, ``fxpar/memory.py``) are scaled to
   every candidate: pipeline degrees up to the number of repeated blocks, the data-parallel
   degree the rest, microbatch sizes that divide the batch, zero 1 or 3 over the replicas, no,
   selective or full recomputation. Candidates that break divisibility, or whose memory exceeds
   the device even so, are set aside with the reason.
2. **Verify.** The best screened candidates are planned for real (``fxpar.compile`` of the global
   batch, pipeline stages cut between blocks, as even in blocks as they divide: ``even_cuts`` in
   ``fxpar/blocks.py``, the cut for time rather than for memory) and estimated exactly; one that
   does not fit moves to the next recomputation level, or is rejected. What is returned always
   fits by the memory model, ranked by estimated step time.

>>> from fxpar.models import gpt
>>> model, (idx,) = gpt.build()
>>> best = autoplan(model, world_size=2, device="cpu", global_batch=4, example_args=(idx[:1],), verbose=False)
>>> best[0].mesh.size
2
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch.utils import _pytree as pytree

from . import schedule as sched
from .blocks import even_cuts, repeated_blocks
from .cost import Estimate, Links, estimate_plan, is_attention
from .devices import profile
from .errors import OptionError
from .mesh import Mesh

SCREEN_MARGIN = 0.9  # a screened candidate may use this much of the device (its memory is scaled, not planned)
VERIFY = 4  # candidates planned for real
RECOMPUTE_ORDER = ("none", "selective", "full")
# one-sample plans per model, reused by later searches over other world sizes
_SCREENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Candidate:
    """A mesh and options with their estimate (``estimate`` is exact once verified)."""

    mesh: Mesh
    options: dict
    estimate: Estimate | None = None
    screened_time: float = 0.0
    screened_memory: float = 0.0

    def describe(self) -> str:
        return f"{self.mesh} {_shown(self.options)}"


class Candidates(list):
    """Candidates best first; ``rejected`` holds ``(description, reason)`` of those set aside."""

    def __init__(self, items=(), rejected=(), device: str = ""):
        super().__init__(items)
        self.rejected = list(rejected)
        self.device = device

    def report(self, top: int = 5) -> str:
        rows = []
        for c in self[:top]:
            e = c.estimate
            rows.append([c.mesh, _shown(c.options), f"{e.step_time:.4g}",
                         f"{e.mfu:.1%}", f"{e.tflops_per_device:.4g}", f"{e.peak_memory / 2**30:.3g}"])
        out = [f"autoplan on {self.device}: best first",
               tabulate(rows, headers=["mesh", "options", "step s", "MFU", "TFLOP/s/dev", "peak GiB"],
                        disable_numparse=True)]
        if self.rejected:
            out.append("set aside:")
            out += [f"  {what}: {why}" for what, why in self.rejected[:top]]
        return "\n".join(out)


def autoplan(model, world_size: int, device="h100-80gb", global_batch: int = 1, example_args=(),
             example_kwargs=None, *, gpus_per_node: int = 8, verbose: bool = True, top: int = 5,
             **fixed_options) -> Candidates:
    """Meshes and options for training ``model`` on ``world_size`` devices of ``device``, best
    first by estimated step time, every one fitting the device's memory by fxpar's memory model.

    ``example_args``/``example_kwargs`` hold ONE sample (batch dimension 1); ``global_batch``
    samples make one optimizer step. ``fixed_options`` fix what is not searched: mesh degrees
    (``tp=8``, ``pp=4``) or plan options (``precision="bf16"``, ``zero=1``, ``recompute="none"``,
    ``schedule``, ``loss_fn``/``example_target``...). With ``verbose`` the best candidates and the
    best set aside are printed with their reasons.

    Returns ``Candidates`` (a list of ``Candidate``: ``.mesh``, ``.options``, ``.estimate``).
    """
    dev = profile(device)
    fixed_mesh = {k: fixed_options.pop(k) for k in ("dp", "pp", "tp", "cp", "ep") if k in fixed_options}
    if fixed_mesh.get("cp", 1) > 1 or fixed_mesh.get("ep", 1) > 1:
        raise OptionError("autoplan searches dp x pp x tp; plan cp and ep meshes with fxpar.estimate")
    one_args, one_kwargs = example_args if isinstance(example_args, tuple) else (example_args,), example_kwargs or {}
    _check_one_sample(one_args, one_kwargs)
    precision = fixed_options.pop("precision", "fp32" if dev.name == "cpu" else "bf16")
    target = fixed_options.pop("example_target", None)
    compile_options = dict(fixed_options, precision=precision)
    rejected: list = []

    from .plan import compile as plan_model

    layers, graph = 1, None
    screens = {}
    for tp in _divisors(world_size):
        if tp > gpus_per_node or fixed_mesh.get("tp", tp) != tp:
            continue
        # the heads are read off the first plan's graph (tp=1 unless tp is fixed: then it is checked after)
        why = _tp_refusal(tp, _attention_heads(graph)) if graph is not None else None
        if why:
            rejected.append((f"tp={tp}", why))
            continue
        for rc in ("none", "full"):
            key = (tp, rc, repr(dev), gpus_per_node, _signature(one_args, one_kwargs, compile_options))
            cache = _SCREENS.setdefault(model, {})
            if key not in cache:
                plan = plan_model(model, Mesh(tp=tp), one_args, one_kwargs, example_target=target,
                                  **_options(compile_options, tp, rc, 0, 1))
                cache[key] = (estimate_plan(plan, dev, gpus_per_node), plan.device_memory()[0], plan.captured.gm)
            *screens[tp, rc], graph = cache[key]
            layers = max(1, len(repeated_blocks(graph)))
        why = _tp_refusal(tp, _attention_heads(graph))
        if why:
            rejected.append((f"tp={tp}", why))
            del screens[tp, "none"], screens[tp, "full"]

    screened, misses = [], []
    for (tp, rc), _ in sorted(screens.items()):
        if rc != "none":
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // tp // pp
            if pp > layers or fixed_mesh.get("pp", pp) != pp or fixed_mesh.get("dp", dp) != dp:
                continue
            if global_batch % dp:
                rejected.append((repr(Mesh(dp=dp, pp=pp, tp=tp)),
                                 f"the batch of {global_batch} does not split over dp={dp}"))
                continue
            best, least = None, None
            for c in _variants(tp, pp, dp, global_batch // dp, screens, dev, gpus_per_node, compile_options):
                if least is None or c.screened_memory < least.screened_memory:
                    least = c
                if c.screened_memory > dev.memory * SCREEN_MARGIN:
                    continue
                if best is None or _rank(c) < _rank(best):
                    best = c
            if best is None:
                misses.append((least.screened_memory, least.describe()))
            else:
                screened.append(best)
    screened.sort(key=lambda c: c.screened_time)
    for need, what in sorted(misses)[:3]:  # those that came closest, with what they would need
        rejected.append((what, f"needs about {need / 2**30:.3g} GiB per device, more than "
                               f"{SCREEN_MARGIN:.0%} of {dev.memory / 2**30:.0f} GiB (the least of its variants)"))

    batch_args, batch_kwargs, batch_target = _batch(one_args, one_kwargs, target, global_batch)
    verified = []
    for c in screened[:VERIFY]:
        levels = ([fixed_options["recompute"]] if "recompute" in fixed_options
                  else RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(c.options["recompute"]):])
        for rc in levels:
            c.options["recompute"] = rc
            if "split_points" not in fixed_options and c.mesh.pp > 1:  # kept: parallelize(**options) cuts alike
                c.options["split_points"] = tuple(even_cuts(graph, c.mesh.pp))
            plan = plan_model(model, c.mesh, batch_args, batch_kwargs, example_target=batch_target,
                              **{**compile_options, **c.options})
            c.estimate = estimate_plan(plan, dev, gpus_per_node)
            if c.estimate.fits:
                verified.append(c)
                break
        else:
            rejected.append((c.describe(), f"planned, needs {c.estimate.peak_memory / 2**30:.3g} GiB per device "
                             f"(> {dev.memory / 2**30:.0f} GiB)"))
    verified.sort(key=lambda c: c.estimate.step_time)
    out = Candidates(verified, rejected, dev.name)
    if verbose:
        print(out.report(top))
    return out


def _variants(tp, pp, dp, per_replica, screens, dev, gpus_per_node, fixed):
    """Candidates of one mesh, scaled from the one-sample plans: microbatch sizes, zero, recompute."""
    mesh = Mesh(dp=dp, pp=pp, tp=tp)
    links = Links(mesh, dev, gpus_per_node)
    zeros = [fixed["zero"]] if "zero" in fixed else ([0] if dp == 1 else [1, 3])
    recomputes = [fixed["recompute"]] if "recompute" in fixed else list(RECOMPUTE_ORDER)
    sizes = [b for b in _divisors(per_replica) if pp == 1 or b == 1 or per_replica // b >= pp]
    if "microbatches" in fixed:
        sizes = [per_replica // fixed["microbatches"]] if per_replica % fixed["microbatches"] == 0 else []
    for mb in sizes:
        m = per_replica // mb
        for zero in zeros:
            for rc in recomputes:
                yield _scaled(mesh, mb, m, zero, rc, screens, links, dev, fixed)


def _scaled(mesh, mb, m, zero, rc, screens, links, dev, fixed) -> Candidate:
    """Step time and the fullest device's memory of a candidate, from the one-sample plans at its tp."""
    tp, pp, dp = mesh.tp, mesh.pp, mesh.dp
    est, mem = screens[tp, "none"]
    est_full, mem_full = screens[tp, "full"]
    per_sample = est.step_time - est.breakdown["optimizer"]
    # of the forward again, as a share of a step's 3 ("auto" screened as selective: it remakes what it must)
    remade = {"none": 0.0, "full": 1.0}.get(rc, 0.1)
    work = per_sample * (1 + remade / 3) * mb / pp
    schedule = sched.make(fixed.get("schedule", "1f1b"), pp, m)
    pipeline = schedule.makespan(work / 3, 2 * work / 3)
    grads = mem.grads / pp
    if zero == 0:
        sync = links.dp_collective(grads, mesh, "all_reduce")
    else:
        sync = links.dp_collective(grads, mesh, "reduce_scatter") + links.dp_collective(grads, mesh, "all_gather")
    if zero == 3:
        sync *= m  # gathered and scattered for every microbatch
        if dev.overlap:
            sync = max(0.0, sync - pipeline)
    optimizer = est.breakdown["optimizer"] / pp / (dp if zero else 1)
    acts = {"none": mem.activations_per_microbatch, "full": mem_full.activations_per_microbatch}
    acts["selective"] = 0.5 * (acts["none"] + acts["full"])  # the attention cores, in between
    in_flight = min(pp, m) if pp > 1 else 1
    per_stage_static = (mem.params + mem.buffers) / pp
    split = lambda x, level: x / dp if zero >= level else x  # noqa: E731
    memory = (split(per_stage_static, 3) + split(mem.grads / pp, 2) + split((mem.optimizer + mem.masters) / pp, 1)
              + acts.get(rc, acts["selective"]) * mb * in_flight / pp)
    if zero == 3:
        memory += 2 * mem.params / pp / max(1, pp)  # a layer whole, and the next prefetched (bounded)
    options = {"microbatches": m, "zero": zero, "recompute": rc, "sequence_parallel": tp > 1,
               "schedule": fixed.get("schedule", "1f1b"), "precision": fixed["precision"]}
    return Candidate(mesh, options, screened_time=pipeline + sync + optimizer, screened_memory=memory)


def _shown(options: dict) -> str:
    """The options as ``k=v``, leaving out the stage cuts (module names, one per stage)."""
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "split_points")


def _rank(c: Candidate) -> float:
    """Screened time, fewer microbatches first among equals (the scaling ignores per-op floors)."""
    return c.screened_time * (1 + 1e-3 * c.options["microbatches"])


def _signature(args, kwargs, options) -> str:
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in pytree.tree_leaves((args, kwargs))]
    return repr((shapes, sorted((k, repr(v)) for k, v in options.items())))


def _options(fixed: dict, tp: int, recompute: str, zero: int, microbatches: int) -> dict:
    return {**fixed, "recompute": recompute, "zero": zero, "microbatches": microbatches, "sequence_parallel": tp > 1}


def _attention_heads(graph) -> list[tuple[int, int]]:
    """(query heads, key/value heads) of every fused attention op of a captured graph."""
    out = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and is_attention(node) and len(node.args) >= 2:
            q, k = (a.meta.get("val") for a in node.args[:2])
            if isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k, torch.Tensor):
                out.append((int(q.shape[1]), int(k.shape[1])))
    return out


def _tp_refusal(tp: int, heads) -> str | None:
    for q, kv in heads:
        if q % tp:
            return f"tp={tp} does not divide the {q} attention heads"
        if kv % tp and tp % kv:
            return f"tp={tp} and the {kv} key/value heads do not divide one another"
    return None


def _check_one_sample(args, kwargs) -> None:
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] != 1:
            raise OptionError(f"autoplan takes ONE sample as example inputs (batch dimension 1); got a tensor of "
                              f"shape {tuple(t.shape)}: give global_batch= for the batch")


def _batch(args, kwargs, target, n: int):
    """The example inputs repeated to ``n`` samples (views: nothing is copied)."""
    grow = lambda t: t.expand(n, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() else t  # noqa: E731
    return pytree.tree_map(grow, args), pytree.tree_map(grow, kwargs), grow(target) if target is not None else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n < 4096 else [1 << i for i in range(int(math.log2(n)) + 1)
                                                                         if n % (1 << i) == 0]
