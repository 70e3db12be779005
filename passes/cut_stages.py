"""Pass (analysis): cut the planned graph into pipeline stages by memory.

Reads ``fxpar_memory`` (``estimate_memory``), the schedule options in ``ctx`` (``pp``,
``schedule``, ``microbatches``, ``virtual``, ``split_points``, ``memory_limit``,
``optimizer``, ``sizes``). Writes ``fxpar_stage`` on every compute node and ``ctx.pipeline``
(``fxpar.stages.PipelineSpec``).

The schedule decides how many microbatches of activations each stage holds at its peak (1F1B: p on
the first stage down to 1 on the last; GPipe: all m), and under a zero-bubble schedule how many
wait between B and W, keeping only what the weight gradients read; it is run symbolically first,
so any schedule is accounted for exactly. A stage's peak is then its parameters, gradients and optimizer state,
plus that many times the activations autograd keeps for one microbatch (values it receives and
keeps counted there too). The cut minimizes the largest peak: a binary search on the budget, each
step a greedy pass that gives every stage as many nodes as fit (optimal for costs that only grow
as a stage grows). Cuts fall between any two compute nodes, not only at module boundaries. Last,
each cut is moved, within 1% of the best largest peak, to where the fewest bytes cross.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxpar import schedule as sched
from fxpar.errors import PlanError, module_path
from fxpar.memory import (
    data_dependent_sizes, evaluate, node_memory, per_device, stage_memory, weight_bytes,
)
from fxpar.plan_context import PlanContext
from fxpar.metadata import STAGE
from fxpar.passes.split_backward import deferred_bytes, deferred_keeps
from fxpar.stages import PipelineSpec, build_stages, compute_nodes, owner_of, replicable

SLACK = 0.01  # how much above the best largest peak a cut may go to send fewer bytes
WINDOW = 96  # nodes a cut may move for that


class _Costs:
    """Numbers for every compute node at the sizes being planned for. ``deferring``: the schedule
    splits backward, and what W keeps counts (a matmul reading a parameter: its output's
    gradient and the storage of its activation input, ``passes/split_backward.py``)."""

    def __init__(self, gm: GraphModule, seq: list[Node], optimizer: str, sizes: dict, names: dict, optimizer_dtype=None,
                 holding=None, deferring: bool = False):
        self.seq = seq
        self.index = {n: i for i, n in enumerate(seq)}
        free = replicable(gm)
        num = lambda e: float(evaluate(e, sizes, names))  # noqa: E731
        self.root_bytes = {n.name: num(node_memory(n).out_bytes) for n in gm.graph.nodes}
        self.value_bytes = {n.name: num(node_memory(n).value_bytes) for n in gm.graph.nodes}
        self.root_of = {n.name: node_memory(n).root or n.name for n in gm.graph.nodes}
        self.new, self.roots, self.params, self.inputs = [], [], [], []
        self.w_out, self.w_roots = [], []  # what W keeps of each node: its output's gradient, activation storages
        for node in seq:
            out, roots = deferred_keeps(node) if deferring else (0, ())
            self.w_out.append(num(out))
            self.w_roots.append(set(roots))
            info = node_memory(node)
            self.new.append(num(info.saved_new))
            self.roots.append(set(info.saved_roots))
            params = {}
            for i in _reads(node, free):
                if i.op == "get_attr":
                    m = node_memory(i)
                    held = sum(num(b) for b in weight_bytes(i.target, m, optimizer, optimizer_dtype, holding))
                    params[i.target] = held + num(m.buffer_bytes)
            self.params.append(params)
            self.inputs.append({(self.index[owner_of(i)], i.name) for i in _reads(node, free)
                                if i not in free and i.op != "get_attr" and owner_of(i) in self.index})
        # the last use of every value made by a compute node (len(seq): the model's output)
        self.produced: list[list[str]] = [[] for _ in seq]
        self.last_use: dict[str, int] = {}
        for node in gm.graph.nodes:
            if owner_of(node) in self.index and node not in free:
                uses = [self.index.get(owner_of(u), len(seq)) if u.op != "output" else len(seq) for u in node.users]
                self.produced[self.index[owner_of(node)]].append(node.name)
                self.last_use[node.name] = max(uses, default=-1)
        # the model's outputs made before the last stage are sent to it and held there
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.outputs = {(self.index[owner_of(i)], i.name) for i in output.all_input_nodes
                        if i not in free and owner_of(i) in self.index}
        self.crossing = self._crossing(gm, free)

    def _crossing(self, gm, free) -> list[float]:
        """Bytes that would be sent if a cut fell before compute node ``g``."""
        n = len(self.seq)
        diff = [0.0] * (n + 2)
        for node in gm.graph.nodes:
            if owner_of(node) not in self.index or node in free:
                continue
            if any(u.target is operator.getitem for u in node.users):
                continue  # a tuple: its getitems are what crosses
            p = self.index[owner_of(node)]
            uses = [self.index.get(owner_of(u), n) if u.op != "output" else n for u in node.users]
            last = max(uses, default=p)
            if last > p:
                # a size known only at run time (tokens one expert got) cannot be sent: the
                # receiver must know what to receive; no cut falls where one crosses
                sent = float("inf") if _run_time_sized(node) else self.value_bytes[node.name]
                diff[p + 1] += sent
                diff[last + 1] -= sent
        out, acc, blocked = [], 0.0, 0
        for g in range(n + 1):
            if diff[g] in (float("inf"), float("-inf")):
                blocked += 1 if diff[g] > 0 else -1
            else:
                acc += diff[g]
            out.append(float("inf") if blocked else acc)
        return out

    def cost(self, a: int, b: int, factor: tuple[int, int]) -> float:
        """Peak bytes of a stage running compute nodes ``[a, b)`` with ``factor`` microbatches:
        (between forward and backward, between B and W)."""
        params, roots, held, new = {}, set(), set(), 0.0
        w_roots, w_out = set(), 0.0
        for i in range(a, b):
            params.update(self.params[i])
            roots |= self.roots[i]
            new += self.new[i]
            w_out += self.w_out[i]
            w_roots |= self.w_roots[i]
            held |= {v for src, v in self.inputs[i] if src < a}
        if b == len(self.seq):
            held |= {v for src, v in self.outputs if src < a}
        # what the stage sends on is kept until its gradient comes back
        if b < len(self.seq):
            held |= {v for i in range(a, b) for v in self.produced[i] if self.last_use[v] >= b}
        held_roots = {self.root_of[v] for v in held}
        act = new + sum(self.value_bytes[v] for v in held) + sum(self.root_bytes.get(r, 0.0) for r in roots - held_roots)
        w = w_out + sum(self.root_bytes.get(r, 0.0) for r in w_roots)
        return sum(params.values()) + factor[0] * act + factor[1] * w


class _Growing:
    """``_Costs.cost(a, b, factor)`` for a stage that starts at ``a`` and grows one node at a time:
    each step costs what the node adds, not the whole stage again (the greedy cut's inner loop)."""

    def __init__(self, c: _Costs, a: int):
        self.c, self.a, self.b = c, a, a
        self.params: dict = {}
        self.param_sum = self.new = self.held_sum = self.roots_sum = self.overlap = self.w_sum = 0.0
        self.roots: set = set()
        self.w_roots: set = set()
        self.held: set = set()
        self.held_roots: dict = {}  # root -> how many held values live in it
        self.sent_on: dict[int, list] = {}  # last use -> values made here and sent on until then

    def _hold(self, v) -> None:
        if v in self.held:
            return
        self.held.add(v)
        self.held_sum += self.c.value_bytes[v]
        r = self.c.root_of[v]
        if not self.held_roots.get(r) and r in self.roots:
            self.overlap += self.c.root_bytes.get(r, 0.0)
        self.held_roots[r] = self.held_roots.get(r, 0) + 1

    def _release(self, v) -> None:
        self.held.discard(v)
        self.held_sum -= self.c.value_bytes[v]
        r = self.c.root_of[v]
        self.held_roots[r] -= 1
        if not self.held_roots[r] and r in self.roots:
            self.overlap -= self.c.root_bytes.get(r, 0.0)

    def extend(self) -> None:
        """Take in node ``b``."""
        c, i = self.c, self.b
        for t, nbytes in c.params[i].items():
            if t not in self.params:
                self.params[t] = nbytes
                self.param_sum += nbytes
        self.new += c.new[i]
        self.w_sum += c.w_out[i]
        for r in c.w_roots[i] - self.w_roots:
            self.w_roots.add(r)
            self.w_sum += c.root_bytes.get(r, 0.0)
        for r in c.roots[i] - self.roots:
            self.roots.add(r)
            self.roots_sum += c.root_bytes.get(r, 0.0)
            if self.held_roots.get(r):
                self.overlap += c.root_bytes.get(r, 0.0)
        for src, v in c.inputs[i]:
            if src < self.a:
                self._hold(v)
        for v in self.sent_on.pop(i, ()):  # read for the last time by node i: no longer sent on
            self._release(v)
        for v in c.produced[i]:
            if c.last_use[v] > i:
                self.sent_on.setdefault(c.last_use[v], []).append(v)
                self._hold(v)
        self.b += 1

    def cost(self, factor: tuple[int, int]) -> float:
        """Peak bytes of the stage ``[a, b)`` with ``factor`` microbatches in flight (``_Costs.cost``)."""
        if self.b == len(self.c.seq):  # the last stage: what ends it is not sent on but kept
            return self.c.cost(self.a, self.b, factor)
        act = self.new + self.held_sum + self.roots_sum - self.overlap
        return self.param_sum + factor[0] * act + factor[1] * self.w_sum


def _run_time_sized(node: Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and any(
        isinstance(d, torch.SymInt) and any(str(x).startswith("u") for x in d.node.expr.free_symbols) for d in v.shape
    )


def _reads(node: Node, free: set[Node]):
    """Inputs of a node, looking through recomputed nodes to the parameters they read."""
    seen, stack = [], list(node.all_input_nodes)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.append(i)
        if i in free and i.op in ("call_function", "call_module"):
            stack.extend(i.all_input_nodes)
    return seen


def _greedy(c: _Costs, factors: list[tuple[int, int]], budget: float) -> list[int] | None:
    """Cut positions giving every stage as many nodes as fit in ``budget``; None if it cannot."""
    cuts, a, k, n = [], 0, 0, len(c.seq)
    stage = _Growing(c, a)
    while stage.b < n:
        stage.extend()
        if stage.cost(factors[k]) <= budget:
            continue
        b = stage.b - 1
        while b > a and c.crossing[b] == float("inf"):
            b -= 1
        if b == a or k + 1 >= len(factors):
            return None
        cuts.append(b)
        a, k = b, k + 1
        stage = _Growing(c, a)
    return cuts


def _bounds(cuts, n):
    edges = [0, *cuts, n]
    return list(zip(edges, edges[1:]))


def _best_cuts(c: _Costs, factors: list[tuple[int, int]]) -> list[int]:
    n, stages = len(c.seq), len(factors)
    if stages > n:
        raise PlanError(f"cannot cut {n} compute nodes into {stages} stages")
    lo, hi = 0.0, c.cost(0, n, (max(f for f, _ in factors), max(w for _, w in factors))) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _greedy(c, factors, mid) is None:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-4 * hi:
            break
    cuts = _greedy(c, factors, hi)
    while len(cuts) < stages - 1:  # fewer stages were enough: split the largest in two
        spans = _bounds(cuts, n)
        a, b = max(spans, key=lambda s: s[1] - s[0])
        mid = min(range(a + 1, b), key=lambda g: (c.crossing[g] == float("inf"), abs(g - (a + b) // 2)))
        cuts = sorted(cuts + [mid])
    return _fewer_bytes(c, factors, cuts, hi * (1 + SLACK))


def _fewer_bytes(c: _Costs, factors, cuts: list[int], budget: float) -> list[int]:
    """Move each cut, keeping both neighbours within ``budget``, to where the fewest bytes cross."""
    n = len(c.seq)
    cuts = list(cuts)
    for k in range(len(cuts)):
        left = cuts[k - 1] if k else 0
        right = cuts[k + 1] if k + 1 < len(cuts) else n
        now = (c.crossing[cuts[k]], 0, cuts[k])
        # the best position is the first that fits, taken in order of bytes crossing (then of
        # distance): stage costs are priced only for positions better than the cut as it is
        better = sorted(t for g in range(max(left + 1, cuts[k] - WINDOW), min(right, cuts[k] + WINDOW + 1))
                        if (t := (c.crossing[g], abs(g - cuts[k]), g)) < now)
        fits = (g for _, _, g in better
                if c.cost(left, g, factors[k]) <= budget and c.cost(g, right, factors[k + 1]) <= budget)
        cuts[k] = next(fits, cuts[k])
    return cuts


def _user_cuts(c: _Costs, points: list[str], stages: int) -> list[int]:
    cuts = []
    for name in points:
        idx = next((i for i, n in enumerate(c.seq) if _in_module(n, name)), None)
        if idx is None:
            raise PlanError(f"split point {name!r} names no module of the model; modules look like {module_path(c.seq[len(c.seq) // 2])!r}")
        if c.crossing[idx] == float("inf"):
            raise PlanError(f"cannot cut before {name!r}: a value whose size is known only at run time (the tokens "
                            "routed to an expert) crosses there; cut before or after the block that makes it")
        cuts.append(idx)
    if len(cuts) != stages - 1 or sorted(cuts) != cuts or len(set(cuts)) != len(cuts):
        raise PlanError(f"{stages} stages need {stages - 1} split points in model order, got {points}")
    return cuts


def _cuts_keeping_params(c: _Costs, param_stages: dict, stages: int) -> list[int]:
    """Cuts that keep every parameter in the stage it was placed in before (another input
    signature of the same module), each moved to where the fewest bytes cross. A weight several
    stages read (``param_stages`` gives their list: a tied embedding, a rotary table) is kept
    where it can be: among the positions the other weights allow, the cut that keeps the most of
    its readers in stages that read it before (a pipeline rank would otherwise need a weight it
    does not hold)."""
    where: list[int | None] = []
    shared: list[set | None] = []  # the stages that read before what node i reads with others
    for i, params in enumerate(c.params):
        found = {param_stages[p] for p in params if isinstance(param_stages.get(p), int)}
        if len(found) > 1:
            raise PlanError(f"{c.seq[i].name} reads parameters of stages {sorted(found)}: the stages cannot be kept")
        where.append(found.pop() if found else None)
        sets = [set(param_stages[p]) for p in params if isinstance(param_stages.get(p), (list, tuple))]
        shared.append(set.intersection(*sets) if sets else None)
    cuts = []
    for k in range(stages - 1):
        lo = max([i + 1 for i, w in enumerate(where) if w is not None and w <= k] + [cuts[-1] + 1 if cuts else 1])
        hi = min([i for i, w in enumerate(where) if w is not None and w > k] + [len(where) - 1])
        if lo > hi:
            raise PlanError("this input signature orders the model's operations differently: its pipeline stages cannot hold the same parameters")

        def misplaced(g):  # readers of shared weights that cut g puts in a stage that did not read them
            return sum(1 for i in range(lo - 1, hi + 1) if i >= 0 and shared[i] is not None
                       and ((i < g and k not in shared[i]) or (i >= g and k + 1 not in shared[i] and k in shared[i])))

        cuts.append(min(range(lo, hi + 1), key=lambda g: (misplaced(g), c.crossing[g], g)))
    return cuts


def _in_module(node: Node, name: str) -> bool:
    path = module_path(node)
    return path == name or path.startswith(name + ".")


def cut_stages(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    v = ctx.options.virtual
    n_stages = ctx.mesh.pp * v
    schedule = sched.make(ctx.options.schedule, ctx.mesh.pp, ctx.options.microbatches, v)
    # per stage: microbatches between forward and backward, and (zero bubble) between B and W
    deferring = schedule.splits_backward
    factors = list(zip(schedule.in_flight(), schedule.weight_pending() if deferring else [0] * schedule.stages))
    free = replicable(gm)
    seq = compute_nodes(gm, free)
    sizes, names = _sizes(gm, ctx)
    holding = ctx.holding()
    costs = _Costs(gm, seq, ctx.options.optimizer, sizes, names, ctx.options.optimizer_dtype, holding, deferring)
    if ctx.options.param_stages:
        cuts = _cuts_keeping_params(costs, ctx.options.param_stages, n_stages)
    elif ctx.options.split_points:
        cuts = _user_cuts(costs, list(ctx.options.split_points), n_stages)
    elif n_stages == 1:
        cuts = []
    else:
        cuts = _best_cuts(costs, factors)
    assignment = {}
    for k, (a, b) in enumerate(_bounds(cuts, len(seq))):
        for node in seq[a:b]:
            assignment[node] = k
            node.meta[STAGE] = k
    stages = build_stages(gm, assignment, n_stages, schedule.stage_rank)
    all_nodes = {n.name: n for n in gm.graph.nodes}
    weights = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    tied: dict[str, list[int]] = {}
    for s in stages:
        nodes = [all_nodes[x] for x in s.nodes] + [weights[p] for p in s.params]
        mem = stage_memory(nodes, all_nodes, ctx.options.optimizer, held=s.inputs + s.outputs,
                           optimizer_dtype=ctx.options.optimizer_dtype, holding=holding)
        mem.in_flight, pending = factors[s.index]
        if deferring:  # as planned here; split_backward settles it once recomputation and gathers are known
            mem.deferred = deferred_bytes([all_nodes[x] for x in s.nodes], all_nodes)
            mem.deferred_in_flight = pending if mem.deferred else 0
        s.memory = mem
        for p in s.params:
            tied.setdefault(p, []).append(s.index)
    ctx.pipeline = PipelineSpec(
        stages, ctx.options.schedule, ctx.options.microbatches, v, {p: js for p, js in tied.items() if len(js) > 1}, sizes
    )
    if ctx.options.memory_limit is not None and ctx.options.recompute == "none":  # else after plan_recompute
        _check_limit(ctx, names)
    return gm


def _sizes(gm: GraphModule, ctx: PlanContext):
    """Values for the symbolic sizes: the user's, else the example inputs' (export's hints), and
    balanced loads for sizes only known at run time (tokens per expert)."""
    names = dict(ctx.dim_names)
    sizes = dict(ctx.options.sizes or {})
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        env = getattr(getattr(v, "fake_mode", None), "shape_env", None)
        if env is not None:
            hints = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
            for sym, val in hints.items():
                key = names.get(str(sym), str(sym))
                sizes.setdefault(key, int(val))
            break
    for key, val in data_dependent_sizes(gm).items():
        sizes.setdefault(key, val)
    return sizes, names


def _check_limit(ctx: PlanContext, names) -> None:
    stages = ctx.pipeline.stages
    devices = per_device([s.memory for s in stages], [s.rank for s in stages])
    peaks = [evaluate(d.peak, ctx.pipeline.sizes, names) for d in devices]
    worst = max(peaks)
    if worst > ctx.options.memory_limit:
        rank = peaks.index(worst)
        held = [s for s in stages if s.rank == rank]
        gib = 1 << 30
        raise PlanError(
            f"no cut into {len(stages)} stages fits {ctx.options.memory_limit / gib:.2f} GiB per device: pipeline rank "
            f"{rank} (stage {', '.join(str(s.index) for s in held)}: {', '.join(held[0].modules[:3])}...) needs "
            f"{worst / gib:.2f} GiB with {', '.join(str(s.memory.in_flight) for s in held)} microbatches in flight. "
            "Use more pipeline or tensor-parallel ranks, smaller microbatches, or a schedule that keeps fewer "
            "in flight (1f1b rather than gpipe)"
        )
