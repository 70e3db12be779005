"""The memory model: what one rank holds for a set of graph nodes.

Per node (``fxpar_memory``, written by ``passes/estimate_memory.py``) it knows the bytes of the
parameter it reads, the storage its output lives in, and what autograd saves for backward when the
node runs: new tensors (a dropout mask, softmax's output, copies made to multiply) and references
to other nodes' outputs (a linear keeps its input). Sizes are sympy expressions in the symbolic
batch/sequence sizes when the graph was captured with them, plain ints otherwise.

From that, for any set of nodes (a pipeline stage):

* parameters, gradients and optimizer state: each parameter once;
* activations kept per microbatch: every saved storage once, however many ops keep it.
"""

from __future__ import annotations

import operator

from dataclasses import dataclass, field

import torch

from .blocks import innermost, owners, repeated_blocks
from .metadata import MEMORY, RECOMPUTE
from .rules.writes import WRITES, mutated_state, written

# optimizer state per parameter, in units of the parameter's own bytes (fp32 states for fp32
# parameters): SGD without momentum keeps nothing, with momentum one buffer, Adam/AdamW two
OPTIMIZER_STATES = {"none": 0, "sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class NodeMemory:
    """One node's contribution. ``out_bytes`` is the storage the node's output creates (0 for a
    view), ``value_bytes`` the size of the output itself (what sending it costs); ``root`` names
    the node whose storage the output lives in (itself unless it is a view); ``saved_roots`` the
    storages of other values autograd keeps when this node runs; ``saved_new`` the bytes of
    tensors it keeps that nothing else made."""

    out_bytes: object = 0
    value_bytes: object = 0
    root: str = ""
    saved_new: object = 0
    saved_roots: tuple[str, ...] = ()
    param_bytes: object = 0
    param_elem: int = 4  # bytes per element of the parameter
    trainable: bool = False
    buffer_bytes: object = 0
    flops: object = 0  # forward FLOPs on this rank


@dataclass
class StageMemory:
    """Bytes one rank needs for a set of nodes, by category (``params``: the weights as the layers
    read them; ``masters``: fp32 copies the optimizer steps, under a compute precision). ``gathered``: what is whole for a
    moment under zero (the weights of the op running and their gradient under zero 3, a gradient
    on its way to being reduce-scattered under zero 2); ``weights``: the elements of the weights
    (each once, as one tp rank holds them), what bytes per parameter are counted over."""

    params: object = 0
    grads: object = 0
    optimizer: object = 0
    buffers: object = 0
    activations_per_microbatch: object = 0
    in_flight: int = 1
    extra: dict = field(default_factory=dict)
    gathered: object = 0
    weights: object = 0
    masters: object = 0  # fp32 master weights the layers read cast (precision)
    recomputed: object = 0  # bytes beyond the kept activations while backward remakes a region (the worst one)
    recompute_flops: object = 0  # forward FLOPs recomputed per microbatch
    offloaded: bool = False  # masters, gradients and optimizer state are in host memory (offload="optimizer")
    cache: object = 0  # of ``buffers``, those the program writes in place: a key/value cache
    cache_per_position: object = 0  # of ``cache``, the bytes of one position (slot) of its length
    deferred: object = 0  # what a microbatch keeps between B and W (zero-bubble schedules)
    deferred_in_flight: int = 0  # the most microbatches between B and W at once

    @property
    def static(self):
        """Bytes on the device that stay for the whole step."""
        kept = self.params + self.buffers
        return kept if self.offloaded else kept + self.masters + self.grads + self.optimizer

    @property
    def host(self):
        """Bytes in host memory (``offload="optimizer"``)."""
        return self.masters + self.grads + self.optimizer if self.offloaded else 0

    @property
    def activations(self):
        """Activations at the stage's peak: microbatches between forward and backward, and
        those between B and W (an upper bound: the two peaks need not coincide)."""
        return self.activations_per_microbatch * self.in_flight + self.deferred * self.deferred_in_flight

    @property
    def peak(self):
        return self.static + self.activations + self.gathered + self.recomputed

    def at(self, sizes: dict | None = None, names: dict | None = None) -> StageMemory:
        """The same, with symbolic sizes replaced by numbers (``{"batch": 8, "seq": 2048}``;
        ``names`` maps export's symbols to those names)."""
        f = lambda e: evaluate(e, sizes, names)  # noqa: E731
        return StageMemory(f(self.params), f(self.grads), f(self.optimizer), f(self.buffers),
                           f(self.activations_per_microbatch), self.in_flight, dict(self.extra), f(self.gathered),
                           f(self.weights), f(self.masters), f(self.recomputed), f(self.recompute_flops), self.offloaded,
                           f(self.cache), f(self.cache_per_position), f(self.deferred), self.deferred_in_flight)


def per_device(stages: list[StageMemory], ranks: list[int]) -> list[StageMemory]:
    """What each pipeline rank holds for the stages it runs (``ranks[j]`` holds stage ``j``): the
    sum over its stages, activations at each stage's own peak (an upper bound with several
    stages per rank, whose peaks need not coincide)."""
    out = [StageMemory() for _ in range(max(ranks) + 1)]
    for m, r in zip(stages, ranks):
        d = out[r]
        d.params += m.params
        d.grads += m.grads
        d.optimizer += m.optimizer
        d.buffers += m.buffers
        d.activations_per_microbatch += m.activations
        d.gathered = m.gathered if d.gathered == 0 else max(d.gathered, m.gathered)  # one stage runs at a time
        d.weights += m.weights
        d.masters += m.masters
        d.recomputed = m.recomputed if d.recomputed == 0 else max(d.recomputed, m.recomputed)
        d.recompute_flops += m.recompute_flops
        d.offloaded = d.offloaded or m.offloaded
        d.cache += m.cache
        d.cache_per_position += m.cache_per_position
    return out


def expr(x):
    """A size as a sympy expression (SymInt) or an int."""
    if isinstance(x, torch.SymInt):
        e = x.node.expr
        return int(e) if e.is_number else e
    return int(x)


def evaluate(e, sizes: dict | None = None, names: dict | None = None):
    """A number from an expression; ``sizes`` by user dim name (``names`` maps symbols to them)."""
    if isinstance(e, (int, float)):
        return e
    subs = {}
    for sym in e.free_symbols:
        key = (names or {}).get(str(sym), str(sym))
        if sizes is None or key not in sizes:
            raise KeyError(f"give a value for the symbolic size {key!r} ({sym})")
        # a run-time size is estimated in terms of the others (tokens per expert of batch x seq)
        subs[sym] = evaluate(sizes[key], {k: v for k, v in sizes.items() if k != key}, names)
    value = e.subs(subs)
    return int(value) if value.is_integer else float(value)


def data_dependent_sizes(gm) -> dict:
    """Values at which the memory model evaluates sizes only known at run time (``u0``: the
    tokens ``torch.where`` hands one expert).

    Such a size is at most the number of elements of what the op that makes it reads (every
    routed slot going to one expert); the sizes made in one module with one bound (its experts)
    share that bound evenly, which is the load a balanced router gives: 4 experts over 64 routed
    slots count 16 each. With symbolic batch and sequence sizes the value is an expression in
    them.
    """
    bounds: dict = {}
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        for size in v.shape:
            if not isinstance(size, torch.SymInt):
                continue
            for sym in size.node.expr.free_symbols:
                if not str(sym).startswith("u") or str(sym) in bounds:
                    continue
                stack = node.meta.get("nn_module_stack") or {}
                owner = list(stack.values())[-1][0] if stack else ""
                bounds[str(sym)] = (owner, _read_elements(node))
    groups: dict = {}
    for key in bounds.values():
        groups[key] = groups.get(key, 0) + 1
    out = {}
    for sym, (owner, bound) in bounds.items():
        if bound is None:
            continue
        n = groups[(owner, bound)]
        out[sym] = max(1, bound // n) if isinstance(bound, int) else bound / n
    out.update(_received_rows(gm, out))
    return out


def _received_rows(gm, known: dict) -> dict:
    """Rows an ep rank's experts receive (``fxpar/ops/experts.py``) at a balanced load: as
    many as the rank sends, shared evenly by its experts."""
    from .ops import experts

    out = {}
    for node in gm.graph.nodes:
        src = node.args[0] if node.target is operator.getitem and node.args else None
        if not (isinstance(src, type(node)) and src.target in (experts.dispatch, experts.dispatch_rows)):
            continue
        v = node.meta.get("val")
        if not (isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)):
            continue
        sym = v.shape[0].node.expr
        if not sym.is_Symbol:
            continue
        sent = src.args[0] if isinstance(src.args[0], list) else [src.args[0]]
        total = sum(expr(s.meta["val"].shape[0]) for s in sent)
        total = total.subs({k: known[str(k)] for k in total.free_symbols if str(k) in known}) if hasattr(total, "subs") else total
        experts_here = len(src.meta["val"]) - 1 if src.target is experts.dispatch_rows else 1
        out[str(sym)] = total / experts_here if not isinstance(total, int) else max(1, total // experts_here)
    return out


def _read_elements(node):
    """Elements of the largest tensor the op making ``node``'s value reads (through getitem)."""
    while node.target is operator.getitem:
        node = node.args[0]
    counts = [expr(a.meta["val"].numel()) for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    counts = [c for c in counts if not any(str(x).startswith("u") for x in getattr(c, "free_symbols", ()))]
    if not counts:
        return None
    numbers = [c for c in counts if isinstance(c, int)]
    return max(numbers) if len(numbers) == len(counts) else counts[0]


def node_memory(node) -> NodeMemory:
    return node.meta.get(MEMORY) or NodeMemory(root=node.name)


def optimizer_bytes(info: NodeMemory, optimizer: str, dtype: torch.dtype | None):
    """Bytes of the optimizer state for one parameter: its states in ``dtype`` (default: the
    parameter's own dtype; fp32 states of 16-bit weights are common)."""
    size = info.param_bytes if dtype is None else info.param_bytes * torch.empty((), dtype=dtype).element_size() / info.param_elem
    return OPTIMIZER_STATES[optimizer] * size


@dataclass(frozen=True)
class Holding:
    """How a rank holds the weights beyond reading them as the graph does: ``zero`` (0 to 3)
    over the ``dp`` ranks (``worlds``: over how many each weight, dp x ep for dense weights under
    expert parallelism) with the rows of each weight it splits (``ctx.zero_rows``), and the
    weights read in a compute precision from fp32 masters (``cast``). Bytes are those of the rank
    holding most rows."""

    zero: int = 0
    dp: int = 1
    rows: dict = field(default_factory=dict)
    cast: frozenset = frozenset()
    host: frozenset = frozenset()  # weights whose masters, gradients and state are in host memory
    worlds: dict = field(default_factory=dict)  # weight -> the ranks its rows are split over (dp, or dp x ep)

    def share(self, target: str, nbytes):
        """The bytes of the largest rank's rows of a weight of ``nbytes`` (all of it if unsplit)."""
        rows = self.rows.get(target)
        if rows is None:
            return nbytes
        most = -(-rows // self.worlds.get(target, self.dp))
        return nbytes * most // rows


MASTER_ELEM = 4  # bytes per element of an fp32 master weight


def weight_bytes(target: str, info: NodeMemory, optimizer: str, optimizer_dtype=None,
                 holding: Holding | None = None) -> tuple:
    """``(weight as read, master, gradient, optimizer state)`` bytes one rank holds for the
    weight ``target``. Zero 1 keeps a whole weight and gradient and 1/dp of the state, zero 2
    also 1/dp of the gradient, zero 3 also of the weight; under a compute precision the rank
    also holds the fp32 master (its rows under zero), whose dtype the gradient and, by default,
    the optimizer state take.

    >>> info = NodeMemory(param_bytes=2000, param_elem=2, trainable=True)  # 1000 bf16 elements
    >>> weight_bytes("w", info, "adamw", None, Holding(cast=frozenset({"w"})))  # 2 + 4 + 4 + 8 per element
    (2000, 4000, 4000, 8000)
    """
    h = holding or Holding()
    cast, split = target in h.cast, target in h.rows
    apart = cast or target in h.host  # the optimizer steps a copy of its own (on the host when offloaded)
    elems = info.param_bytes // info.param_elem
    master = elems * (MASTER_ELEM if cast else info.param_elem)
    grad = master if info.trainable else 0
    state_elem = torch.empty((), dtype=optimizer_dtype).element_size() if optimizer_dtype else master // max(elems, 1)
    state = OPTIMIZER_STATES[optimizer] * elems * state_elem if info.trainable else 0
    if not split:
        return info.param_bytes, master if apart else 0, grad, state
    share, level = h.share, h.zero
    whole = info.param_bytes if level < 3 else 0
    if apart:  # offloaded, zero 1 reduces at once as 2 does: the whole gradient never stays on the device
        at_once = level >= 2 or target in h.host
        return whole, share(target, master), share(target, grad) if at_once else grad, share(target, state)
    weight = whole if level < 3 else share(target, master)
    return weight, 0, share(target, grad) if level >= 2 else grad, share(target, state)


def stage_memory(nodes, all_nodes: dict, optimizer: str = "adamw", held=(), optimizer_dtype=None,
                 holding: Holding | None = None) -> StageMemory:
    """What one rank holds for ``nodes`` (a list of graph nodes) with one microbatch in flight.

    ``all_nodes`` maps names to nodes of the whole graph, for saved values made elsewhere (a value
    received from the previous stage and kept here counts here); ``held`` names values kept until
    backward whether an op saved them or not (what a stage received, what it sent on); ``holding``
    how the rank holds the weights (zero, fp32 masters).
    """
    m = StageMemory()
    for node in nodes:
        info = node_memory(node)
        if info.param_bytes:
            weight, master, grad, state = weight_bytes(node.target, info, optimizer, optimizer_dtype, holding)
            m.params += weight
            m.masters += master
            m.grads += grad
            m.optimizer += state
            m.weights += info.param_bytes // info.param_elem
        m.buffers += info.buffer_bytes
        positions = cache_positions(node) if info.buffer_bytes else None
        if positions is not None:
            m.cache += info.buffer_bytes
            m.cache_per_position += info.buffer_bytes // positions if positions else 0
    kept, regions = activations(nodes, all_nodes, held)
    m.activations_per_microbatch = kept
    for r in regions.values():
        m.recomputed = _max(m.recomputed, r.before + r.remade - kept)
        m.recompute_flops += r.flops
    if holding is not None and (holding.zero >= 2 or holding.host):
        m.gathered = _gathered(nodes, holding)
    m.offloaded = bool(holding is not None and holding.host)
    return m


def cache_positions(node) -> int | None:
    """For a buffer the program writes in place (a key/value cache), the length of the dim it
    writes positions along (0 where it writes all of it: a counter); None for other tensors."""
    stack, found = [node], None
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op != "call_function" or not user.args or user.args[0] is not n:
                continue
            if getattr(user.target, "is_view", False):
                stack.append(user)
            elif user.target in WRITES or n in mutated_state(user):
                w = written(user) if user.target in WRITES else None
                dims = w[2] if w is not None else set()
                size = n.meta["val"].shape[next(iter(dims))] if len(dims) == 1 else 0
                found = max(found or 0, size if isinstance(size, int) else 0)
    return found


@dataclass(frozen=True)
class RegionMemory:
    """A region backward recomputes (``fxpar_recompute``): ``remade`` the bytes its ops keep when
    remade (what they would have kept), ``before`` what the rank still keeps when backward reaches
    it (everything kept up to its first op: what ops after it kept is freed by then), ``flops``
    the forward FLOPs of remaking it."""

    before: object = 0
    remade: object = 0
    flops: object = 0


def activations(nodes, all_nodes: dict, held=()) -> tuple[object, dict[str, RegionMemory]]:
    """Bytes kept for backward by ``nodes`` with one microbatch in flight (every storage once,
    however many ops keep it; a recomputed region keeps only what it reads from outside), and the
    regions among them by name."""
    kept: dict[str, int] = {}  # storage kept for backward -> position of the first node keeping it
    for h in dict.fromkeys(held):  # a received value is a fresh tensor here, whatever it was a view of there
        kept.setdefault(node_memory(all_nodes[h]).root or h, -1)
    received = set(kept)
    base = sum(node_memory(all_nodes[h]).value_bytes for h in received)
    new_at: list = []  # (position, bytes saved new there)
    parts: dict = {}  # region -> [position of its first node, bytes its ops save new, storages they keep, flops]
    for i, node in enumerate(nodes):
        info = node_memory(node)
        region = node.meta.get(RECOMPUTE)
        if region is None:
            new_at.append((i, info.saved_new))
            for r in info.saved_roots:
                kept.setdefault(r, i)
            continue
        part = parts.setdefault(region, [i, 0, set(), 0])
        part[1] += info.saved_new
        part[2].update(info.saved_roots)
        part[3] += info.flops
        for x in node.all_input_nodes:
            if x.meta.get(RECOMPUTE) != region and x.op != "get_attr":
                kept.setdefault(node_memory(x).root or x.name, part[0])
    kept_at = new_at + [(i, node_memory(all_nodes[r]).out_bytes) for r, i in kept.items()
                        if r not in received and r in all_nodes]
    regions = {}
    for region, (first, saved, roots, flops) in parts.items():
        inside = sum(node_memory(all_nodes[r]).out_bytes for r in roots
                     if r in all_nodes and all_nodes[r].meta.get(RECOMPUTE) == region)
        regions[region] = RegionMemory(base + sum(b for i, b in kept_at if i <= first), saved + inside, flops)
    return base + sum(b for _, b in kept_at), regions


def _max(a, b):
    """The larger of two sizes, either an expression in symbolic sizes."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return max(a, b)
    import sympy

    return sympy.Max(a, b)


def _gathered(nodes, holding: Holding):
    """The most bytes whole at once on the device beyond what stays: the weights of one layer
    (``gather_params`` gathers a repeated block's weights together; outside blocks, a module's),
    under zero 3 whole while the layer runs, with the next layer's gathered meanwhile, and their
    gradients before the reduce-scatter (zero 2, 3) or before they move to the host (offload)."""
    if not nodes:
        return 0
    gm = nodes[0].graph.owning_module
    block_of = owners(gm, repeated_blocks(gm)) if gm is not None else {}
    units: dict[str, dict] = {}
    for node in nodes:
        for i in node.all_input_nodes:
            if i.op == "get_attr" and ((holding.zero >= 2 and i.target in holding.rows) or i.target in holding.host):
                units.setdefault(block_of.get(node) or innermost(node), {})[i.target] = i
    grads = [sum(node_memory(i).param_bytes for i in w.values()) for w in units.values()]
    gathered = [sum(node_memory(i).param_bytes for t, i in w.items() if holding.zero == 3 and t in holding.rows)
                for w in units.values()]
    # the next layer's weights are gathered (prefetched) while one runs
    return max((g + w + (gathered[k + 1] if k + 1 < len(gathered) else 0)
                for k, (g, w) in enumerate(zip(grads, gathered))), default=0)
