"""The step-time cost model: how long one optimizer step of a plan takes on a device profile.

``estimate_plan(plan, device)`` prices what the plan says each rank runs, with no
measurement and nothing fitted to a model:

* **compute**: every op of a stage on a roofline (``fxpar/devices.py``): the larger of its FLOPs
  over the device's matmul peak for its dtype (times the fraction large GEMMs reach) and the bytes
  it reads and writes over the memory bandwidth, and at least one kernel launch; views cost
  nothing. FLOPs are counted by torch's ``FlopCounterMode`` when the plan is made
  (``passes/estimate_memory.py``). Backward costs twice the forward (two matmuls per matmul,
  the same for the bytes of elementwise ops); recomputed regions run their forward again.
* **communication**: every collective the plan inserted (``fxpar_comm``: the bytes a rank sends
  with a ring), an alpha-beta model per link: steps x latency + bytes / bandwidth (the steps of a
  ring or of a tree, whichever are fewer, as NCCL chooses), where a mesh
  dimension whose groups fit in one node (``gpus_per_node``) runs over NVLink and one that spans
  nodes over the network. On a device whose collectives run beside its compute (``overlap``), a
  collective is exposed by what the work around it cannot hide: a collective begun early hides
  behind the ops up to its wait (forward, and twice that in backward), each step of a collective
  matmul's ring behind one chunk's matmul (``fxpar/ops/collective_matmul.py``), ring attention's
  transfers behind its blocks; zero 3's weight gathers are prefetched and hide behind a stage's
  compute. Every other collective is exposed whole.
  Data-parallel gradient reduction (an all-reduce, or a reduce-scatter and an all-gather under
  zero) follows the last backward; pipeline sends and receives add to the stage that waits.
* **bubble**: the schedule itself (``fxpar/schedule.py``) run with each stage's forward and
  backward times (``Schedule.makespan``), so uneven stages and interleaving are priced as run.
* **optimizer**: the bytes the step reads and writes (weights, gradients, states) over the
  memory bandwidth.

``tflops_per_device`` counts what the devices execute, recomputation included (the convention of
Megatron-LM's papers); ``mfu`` the single-device model's FLOPs only (PaLM's convention: forward
and backward, 3 x the forward's), against the peak of the dtype the layers compute in.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

from . import schedule as sched
from .devices import DeviceProfile, profile
from .memory import evaluate, node_memory, per_device
from .metadata import COMM, DEFERRED, RECOMPUTE, out_placement
from .runtime.buckets import BUCKET_BYTES
from .options import compute_dtype
from .ops import collective_matmul as CM
from .ops import params as _registers_gather_params  # noqa: F401 - defines torch.ops.fxpar.gather_params
from .ops.async_collectives import SYNC, wait
from .ops.ring import ring_attention
from .placement import Replicate

_GATHER = torch.ops.fxpar.gather_params.default  # zero's gather of one bucket of weights
_COLLECTIVE_STEPS = {"all_reduce": 2, "copy_to_tp": 2, "sum_duplicates": 2, "to_partial": 0, "pick_local": 0, "ring": 1}


@dataclass
class Estimate:
    """One optimizer step of a plan on a device profile (``fxpar.estimate``).

    ``step_time`` seconds for the global batch; ``tflops_per_device`` FLOPs executed per device
    per second / 1e12 (recomputation included); ``mfu`` model FLOPs utilization (recomputation not
    counted); ``peak_memory`` bytes on the fullest device; ``breakdown`` seconds by cause, summing
    to ``step_time``: ``compute``, ``comm tp`` / ``comm cp`` / ``comm ep`` / ``comm pp`` (exposed, on
    the busiest pipeline rank), ``bubble``, ``comm dp``, ``optimizer``."""

    step_time: float
    tflops_per_device: float
    mfu: float
    peak_memory: float
    breakdown: dict = field(default_factory=dict)
    device: str = ""
    memory_limit: float = 0.0
    model_flops: float = 0.0

    @property
    def fits(self) -> bool:
        """Whether the fullest device's peak fits the device's memory."""
        return self.peak_memory <= self.memory_limit

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.breakdown.items() if v)
        return (f"step {self.step_time * 1e3:.4g} ms on {self.device}: "
                f"{self.tflops_per_device:.4g} TFLOP/s per device, "
                f"MFU {self.mfu:.1%}, peak {self.peak_memory / 2**30:.3g} GiB ({parts})")


def estimate_plan(plan, device="cpu", gpus_per_node: int = 8) -> Estimate:
    """The ``Estimate`` of ``plan`` (a ``fxpar.Plan``) on ``device`` (a profile name or a
    ``DeviceProfile``), ``gpus_per_node`` devices sharing the fast link."""
    dev = profile(device)
    ctx, gm, mesh = plan.ctx, plan.graph_module, plan.mesh
    spec = ctx.pipeline
    sizes, names = spec.sizes, ctx.dim_names
    num = lambda e: float(evaluate(e, sizes, names))  # noqa: E731
    links = Links(mesh, dev, gpus_per_node)
    nodes = {n.name: n for n in gm.graph.nodes}
    m = spec.microbatches
    zero = ctx.options.zero
    memories = [s.memory.at(sizes, names) for s in spec.stages]
    layer_dtype = compute_dtype(ctx.options.precision) or torch.float32

    fwd, bwd, weight, parts, flops_run, flops_model = [], [], [], [], 0.0, 0.0
    beside = _work_beside(gm, dev, num) if dev.overlap else {}
    for s, mem in zip(spec.stages, memories):
        t = {"compute": 0.0, "tp": 0.0, "cp": 0.0, "ep": 0.0, "pp": 0.0, "dp": 0.0}
        t_b = dict(t)
        recompute = 0.0
        w = 0.0  # of backward, the weight gradients a zero-bubble schedule runs as W
        for name in s.nodes:
            node = nodes[name]
            info = node.meta.get(COMM)
            computes = info is None or node.target in _COMPUTING
            seconds = _op_time(node, dev, num) if computes else 0.0
            if info is not None:
                f, b = links.collective(info, num)
                if dev.overlap:
                    f, b = _exposed(node, info, f, b, seconds, beside, links)
                t[info.group] += f
                t_b[info.group] += b
                if node.meta.get(RECOMPUTE):
                    recompute += f
                if not computes:
                    continue
            t["compute"] += seconds
            if DEFERRED in node.meta:  # the weight gradient: a GEMM as large as the forward's
                w += seconds
            if node.meta.get(RECOMPUTE):
                recompute += seconds
            flops = num(node_memory(node).flops)
            flops_run += flops * (4 if node.meta.get(RECOMPUTE) else 3)
            flops_model += 3 * flops * _replicas_of_work(node, mesh)
        t_b["compute"] = 2 * t["compute"] + recompute
        sent = sum(num(node_memory(nodes[o]).value_bytes) for o in s.outputs if o in nodes)
        received = sum(num(node_memory(nodes[i]).value_bytes) for i in s.inputs if i in nodes)
        t["pp"] += links.p2p(received)
        t_b["pp"] += links.p2p(sent)
        if zero >= 2:  # gradients reduce-scattered as each layer's backward ends, one collective a bucket
            calls = max(1, sum(1 for name in s.nodes if nodes[name].target is _GATHER))
            whole = mem.weights * layer_dtype.itemsize  # the weights as the layers read them
            scatter = links.dp_collective(mem.weights * 4, mesh, "reduce_scatter", calls)
            if ctx.options.overlap and dev.overlap:  # each begun as its layer's backward ends: the last one shows
                scatter = max(scatter / calls, scatter - t_b["compute"])
            t_b["dp"] = scatter
            if zero == 3:  # each layer's weights gathered ahead (prefetched): only what compute cannot hide
                gather = links.dp_collective(whole, mesh, "all_gather", calls)
                hide = dev.overlap
                t["dp"] = max(0.0, gather - hide * t["compute"])
                t_b["dp"] += max(0.0, gather - hide * t_b["compute"])
        fwd.append(sum(t.values()))
        bwd.append(sum(t_b.values()))
        weight.append(w)
        parts.append({k: t[k] + t_b[k] for k in t})

    schedule = sched.make(spec.schedule, mesh.pp, m, spec.virtual)
    pipeline = schedule.makespan(fwd, bwd, weight)
    stage_rank = [s.rank for s in spec.stages]
    busy = [0.0] * mesh.pp
    per_rank = [dict.fromkeys(parts[0], 0.0) for _ in range(mesh.pp)]
    for j, r in enumerate(stage_rank):
        busy[r] += m * (fwd[j] + bwd[j])
        for k, v in parts[j].items():
            per_rank[r][k] += m * v
    worst = max(range(mesh.pp), key=busy.__getitem__)
    devices = per_device(memories, stage_rank)
    # what the data-parallel all-reduces can run beside: each pipeline rank's last backward
    window = None
    if ctx.options.overlap and dev.overlap:
        window = [sum(bwd[j] for j, r in enumerate(stage_rank) if r == k) for k in range(mesh.pp)]
    dp = _dp_sync(devices, mesh, zero, links, window)
    optimizer = max(_optimizer_time(d, dev, ctx.options.optimizer) for d in devices)
    breakdown = {"compute": per_rank[worst]["compute"]}
    breakdown.update({f"comm {k}": per_rank[worst][k] for k in ("tp", "cp", "ep", "pp")})
    breakdown["bubble"] = max(0.0, pipeline - busy[worst])
    breakdown["comm dp"] = per_rank[worst]["dp"] + dp
    breakdown["optimizer"] = optimizer
    step = sum(breakdown.values())
    flops_run *= m / mesh.pp  # per device: its pipeline rank's share, every microbatch
    flops_model *= m * mesh.replicas
    return Estimate(
        step_time=step,
        tflops_per_device=flops_run / step / 1e12,
        mfu=flops_model / (step * mesh.size * dev.peak(layer_dtype)),
        peak_memory=max(float(d.peak) for d in devices),
        breakdown=breakdown,
        device=dev.name,
        memory_limit=dev.memory,
        model_flops=flops_model,
    )


class Links:
    """Latency and bandwidth of each mesh dimension's groups on ``dev`` (the autoplanner prices its
    candidates' data-parallel traffic with it too)."""

    def __init__(self, mesh, dev: DeviceProfile, gpus_per_node: int):
        self.mesh, self.dev = mesh, dev
        self.inside = {}
        stride = 1
        for name in reversed(("dp", "pp", "ep", "cp", "tp")):
            size = getattr(mesh, name)
            self.inside[name] = stride * size <= gpus_per_node  # every group within one node
            stride *= size
        self.inside["dp_ep"] = self.inside["dp"] and self.inside["ep"]

    def _link(self, group: str) -> tuple[float, float]:
        d = self.dev
        if self.inside.get(group, False):
            return d.intra_alpha, d.intra_bw * d.link_eff
        return d.inter_alpha, d.inter_bw * d.link_eff

    def _world(self, group: str) -> int:
        return self.mesh.dp * self.mesh.ep if group == "dp_ep" else getattr(self.mesh, group)

    def collective(self, info, num) -> tuple[float, float]:
        """Forward and backward seconds of a collective node."""
        n = self._world(info.group)
        alpha, bw = self._link(info.group)
        steps = _COLLECTIVE_STEPS.get(info.kind, 1) * _latency_steps(n)
        out = []
        for moved in (num(info.bytes), num(info.bwd_bytes)):
            out.append(steps * alpha + moved / bw if moved else 0.0)
        return out[0], out[1]

    def p2p(self, nbytes: float) -> float:
        if not nbytes or self.mesh.pp == 1:
            return 0.0
        alpha, bw = self._link("pp")
        return alpha + nbytes / bw

    def dp_collective(self, nbytes, mesh, kind: str, calls: int = 1) -> float:
        """Ring collectives over the data-parallel replicas of ``nbytes`` in all (whole, per
        rank), in ``calls`` collectives."""
        group = "dp_ep" if mesh.ep > 1 else "dp"
        n = self._world(group)
        if n == 1 or not nbytes:
            return 0.0
        alpha, bw = self._link(group)
        factor = 2 if kind == "all_reduce" else 1
        return factor * (calls * _latency_steps(n) * alpha + (n - 1) / n * float(nbytes) / bw)


def _latency_steps(n: int) -> int:
    """Latency-bound steps of a collective over ``n`` ranks (per pass: an all-reduce makes two):
    a ring's n - 1, or a tree's log2 n where that is fewer, as NCCL picks (double binary trees for
    all-reduce, PAT for all-gather and reduce-scatter) and the bandwidth term stays the ring's."""
    return min(n - 1, max(1, math.ceil(math.log2(n)))) if n > 1 else 0


def _op_time(node, dev: DeviceProfile, num) -> float:
    """A roofline: FLOPs at the matmul (or fused attention) peak, or bytes at the memory
    bandwidth, or elements at the elementwise rate; at least a launch."""
    if node.op not in ("call_function", "call_module") or node.target is operator.getitem:
        return 0.0
    info = node_memory(node)
    flops = num(info.flops)
    out = num(info.value_bytes)
    if not flops and not num(info.out_bytes):
        return 0.0  # a view
    moved = out + sum(num(node_memory(i).value_bytes) for i in node.all_input_nodes)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):  # several outputs of one op (fused linears): they share a dtype
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    if flops:
        eff = dev.attention_eff if is_attention(node) else dev.matmul_eff
        compute = flops / (dev.peak(dtype) * eff)
    else:
        compute = moved / dtype.itemsize / dev.vector_rate
    return max(compute, moved / (dev.memory_bw * dev.memory_eff), dev.launch)


_COMPUTING = (ring_attention, CM.gathered_linears, CM.linear_reduce_scatter)  # collectives that compute too


def _exposed(node, info, f: float, b: float, seconds: float, beside: dict, links) -> tuple[float, float]:
    """What of a collective's forward and backward transfers (``f``, ``b``) the computation
    beside it leaves exposed. ``seconds``: the node's own forward compute, when it computes."""
    if info.kind == "ring":
        # w-1 transfers of keys and values, each beside one of the w blocks' compute (twice as
        # long in backward); the gradients' transfers wait for their block
        share = (links._world("cp") - 1) / links._world("cp")
        return max(0.0, f - share * seconds), max(0.0, f - 2 * share * seconds) + max(0.0, b - f)
    if node.target in (CM.gathered_linears, CM.linear_reduce_scatter):
        # t-1 steps around the tp ring, each chunk's transfer beside one chunk's matmul: forward
        # the linears, backward the input gradient's (the weight gradients follow the ring)
        overlap = _arg(node, 7, "overlap", True) if node.target is CM.gathered_linears else _arg(node, 6, "overlap", True)
        if not overlap:
            return f, b
        t = links._world(info.group)
        return _ring_exposed(f, seconds, t), _ring_exposed(b, seconds, t)
    between = beside.get(node.name, 0.0)  # a collective begun early, waited for late
    return max(0.0, f - between), max(0.0, b - 2 * between)


def _ring_exposed(transfer: float, compute: float, t: int) -> float:
    """What t-1 ring steps leave exposed, each moving ``transfer/(t-1)`` beside ``compute/t``."""
    return (t - 1) * max(0.0, transfer / (t - 1) - compute / t) if t > 1 else 0.0


def _arg(node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _work_beside(gm, dev, num) -> dict[str, float]:
    """Per collective begun early (``*_start``), the forward compute between it and its wait."""
    out, open_ = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is wait and node.args[0].name in open_:
            out[node.args[0].name] = open_.pop(node.args[0].name)
        elif node.target in SYNC:
            open_[node.name] = 0.0
        elif open_ and COMM not in node.meta:  # priced only where a transfer is in flight
            seconds = _op_time(node, dev, num)
            for k in open_:
                open_[k] += seconds
    return out


def is_attention(node) -> bool:
    """A fused attention kernel (its FLOPs run at attention's efficiency, not a GEMM's)."""
    name = getattr(node.target, "__name__", str(node.target))
    return ("scaled_dot_product" in name or "flash_attention" in name or "flex_attention" in name
            or name == "ring_attention")


def _replicas_of_work(node, mesh) -> int:
    """How many ranks of a tp x cp group compute different parts of this node's work: all of
    them where the output is split or partial, one where every tp rank computes it whole."""
    place = out_placement(node)
    tp = 1 if place is None or isinstance(place, Replicate) else mesh.tp
    return tp * mesh.cp


def _dp_sync(devices, mesh, zero: int, links: Links, window=None) -> float:
    """After the last backward: gradients all-reduced over the replicas (zero 0), or
    reduce-scattered (zero 1; zero 2 and 3 did during backward, priced with the stages) and the
    updated rows all-gathered (zero 1 and 2; zero 3 gathers at the next use). ``window``: per
    device, the backward time its all-reduces can run beside (``overlap``: buckets begin as the
    last microbatch's backward makes them final); only what is left of them is exposed, and at
    least the last bucket's, which begins when backward ends."""
    worst = 0.0
    for i, d in enumerate(devices):
        whole = float(d.weights) * 4
        if zero == 0:
            t = links.dp_collective(d.grads, mesh, "all_reduce")
            if window is not None and t:
                last = links.dp_collective(min(float(d.grads), BUCKET_BYTES), mesh, "all_reduce")
                t = max(last, t - window[i])
        else:
            t = links.dp_collective(whole, mesh, "reduce_scatter") if zero == 1 else 0.0
            t += links.dp_collective(whole, mesh, "all_gather") if zero < 3 else 0.0
        worst = max(worst, t)
    return worst


def _optimizer_time(d, dev: DeviceProfile, optimizer: str) -> float:
    """The step's passes over parameter-sized tensors (weights or masters, gradients, states)."""
    weights = float(d.masters) or float(d.params)
    adam = dev.optimizer_passes
    passes = {"adam": adam, "adamw": adam, "sgd_momentum": 5, "sgd": 3}.get(optimizer, 0)
    return passes * weights / (dev.memory_bw * dev.memory_eff)



def estimate(model, mesh, example_args=(), example_kwargs=None, *, device="h100-80gb", gpus_per_node: int = 8,
             **options) -> Estimate:
    """How long one optimizer step of ``model`` over ``mesh`` takes on ``device``, planned as
    ``fxpar.compile(model, mesh, example_args, example_kwargs, **options)`` plans it (the example
    inputs are the global batch; the model may be on the meta device).

    >>> from fxpar.models import gpt
    >>> model, (idx,) = gpt.build()
    >>> from fxpar import Mesh
    >>> e = estimate(model, Mesh(tp=2), (idx,), device="h100-80gb")
    >>> e.step_time > 0 and 0 < e.mfu < 1
    True
    """
    from .plan import compile as plan_model

    plan = plan_model(model, mesh, example_args, example_kwargs, **options)
    return estimate_plan(plan, device, gpus_per_node)
