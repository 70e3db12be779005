"""Pass (analysis): place every value over the tp ranks, deciding column/row parallelism from
the data flow.

Reads ``val``, ``nn_module_stack``, the per-op rules in ``fxpar.rules`` and
``ctx.options.fixed_weights`` (placements another capture of the same module already gave its weights:
the plan works around them, gathering a weight where it must). Writes
``fxpar_placement`` and ``fxpar_inputs`` on every node, ``fxpar_decision`` on every matmul with a
weight and every embedding, ``fxpar_fallback`` where an op with no rule had to gather; fills
``ctx.decisions`` (by module name, e.g. ``{"transformer.h.0.attn.c_attn": "colwise"}``),
``ctx.param_placements`` (by parameter name) and ``ctx.warnings``.

How it decides. Placements are propagated forward in graph order: graph inputs are replicated;
a matmul with a weight and a replicated input splits the weight by output features
(column-parallel); a matmul whose input arrives split along the contracted dim splits its weight
the same way (row-parallel) and yields a partial sum; every other op follows its rule. Then the
result is inspected edge by edge:

* a sharded value that must be gathered before an op that cannot take it (layer_norm over a split
  hidden size, a loss, the sharded dim merged away) means the column split that produced it does
  not pay: the matmuls that started that region are turned back to replicated;
* a sharded value that an op wants in another layout (a split into q/k/v that wants each piece
  evenly split, attention that wants the one key/value head whole on every rank) is carried back
  through views, cuts, concatenations and elementwise ops to the matmul that produced it, which
  then stores its weight in that layout; a request that reaches one piece of a cut changes that
  piece only, and requests that reach one value along several paths are united. Layouts may give
  several ranks the same rows (key/value heads shared by the ranks whose query heads read them):
  ``insert_collectives`` then sums those rows' gradients over their owners;
* a column split whose output would be added to the replicated residual stream (no row-parallel
  matmul closes the region) is turned back too, so the residual stream never becomes sharded;
* a partial sum that some consumer needs whole is reduced where it is made (before casts and
  scalings that only carry it along), once for all consumers.

A column split that does not pay is turned back only after the round's layout requests are in
(a split whose layout was just refined gets the next round to show that it helps), and it loses
its column split only: should its input arrive split later, it still closes that region
row-parallel, so one turned-back split never spreads to its neighbours. After the rounds settle,
low-rank bottlenecks (``A (r) -> norm -> B (n)``, r small) are planned the other way too (A whole,
B split by its outputs), and that plan is kept where it communicates less and B stays split.

The propagation is repeated until nothing changes. Each round can only turn column splits back,
refine a layout (never to one a split had before) or move a reduction earlier, so it ends. Correctness never
depends on it: every round's placements already make a correct program, because
``insert_collectives`` converts wherever a producer and a consumer disagree; the rounds only
remove communication. What remains are gathers that cannot be avoided (the model's outputs) or
that the user forced, reported as warnings that name the node.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxpar.layout_algebra import holds_all_of, union_layout, whole_everywhere
from fxpar.errors import PlanError, describe_node, module_path, source_line
from fxpar.metadata import DECISION, FALLBACK, INPUTS, PLACEMENT, REQUIRES_GRAD
from fxpar.placement import PARTIAL, REPLICATE, Placement, Shard
from fxpar.plan_context import Decision, PlanContext, Replicated
from fxpar.rules import FREE, WEIGHT_TRANSPARENT, inverse_of, is_weight, rule_for, user_dependent
from fxpar.rules.base import is_tensor_node, ndim, op_name, shape, static, static_numel, tensor_args
from fxpar.rules.matmul import NO_COLUMN, decidable_ops, feature_dim
from fxpar.rules.pointwise import EXTRA_ELEMENTWISE
from fxpar.rules.slicing import invert_cut
from fxpar.passes.insert_collectives import comm_info, conversion

aten = torch.ops.aten
EMBEDDINGS = {aten.embedding.default}


class _Decisions:
    """The choices the rounds refine: per decidable node, a mode and an optional layout."""

    def __init__(self):
        self.mode: dict[Node, str] = {}
        self.layout: dict[Node, Shard] = {}
        self.forced: set[Node] = set()
        self.why: dict[Node, str] = {}
        self.reduce_early: set[Node] = set()  # partial sums all-reduced where they are made
        self.tried: dict[Node, set] = {}  # layouts each split has been given

        self.matmuls = decidable_ops()  # matmuls with a weight: column/row decisions
        self.seed_ops = self.matmuls | EMBEDDINGS  # where sharded regions start

    def copy(self) -> "_Decisions":
        other = _Decisions.__new__(_Decisions)
        other.__dict__.update({k: (v.copy() if isinstance(v, dict | set) else v) for k, v in self.__dict__.items()})
        other.tried = {k: set(v) for k, v in self.tried.items()}
        return other


class _Round:
    """One forward propagation of placements under fixed decisions."""

    def __init__(self, gm: GraphModule, world: int, decisions: _Decisions, user_dep: set[Node], fixed: dict | None = None):
        self.gm, self.world, self.d, self.user_dep = gm, world, decisions, user_dep
        self.fixed = fixed or {}  # weights whose placement is already decided
        self.place: dict[Node, object] = {}
        self.inputs: dict[Node, dict[Node, Placement]] = {}
        self.fallback: dict[Node, str] = {}
        self.seeds: dict[Node, frozenset] = {}  # the matmuls/embeddings whose split a value carries
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    # the RuleContext protocol ---------------------------------------------------------------
    def placement(self, node):
        if not isinstance(node, Node):
            return None
        p = self.place.get(node, REPLICATE)
        return REPLICATE if p is PARTIAL and node in self.d.reduce_early else p

    def decision(self, node: Node) -> str:
        return self.d.mode.get(node, "auto")

    def seed_layout(self, node: Node):
        return self.d.layout.get(node)

    def user_input_dependent(self, node: Node) -> bool:
        return node in self.user_dep

    def is_weight(self, node: Node) -> bool:
        return is_weight(node)

    # propagation --------------------------------------------------------------------------
    def run(self) -> "_Round":
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.place[node] = REPLICATE if is_tensor_node(node) else None
            elif node.op == "get_attr":
                self.place[node] = self.fixed.get(node.target, FREE) if is_tensor_node(node) else None
            elif node.op == "output":
                self.inputs[node] = {n: REPLICATE for n in tensor_args(node)}
            elif self._weight_view(node):
                self.place[node] = FREE
            else:
                self._apply(node)
        return self

    def _weight_view(self, node: Node) -> bool:
        ins = tensor_args(node)
        return (
            node.op == "call_function"
            and node.target in WEIGHT_TRANSPARENT
            and len(ins) == 1
            and self.place.get(ins[0]) is FREE
        )

    def _apply(self, node: Node) -> None:
        try:
            s = rule_for(node)(node, self)
        except Exception as e:  # noqa: BLE001 - a rule bug must name the node
            raise PlanError(f"sharding rule failed on {describe_node(node)}\n  {type(e).__name__}: {e}") from e
        for inp in tensor_args(node):
            req = s.inputs.get(inp)
            if self.place.get(inp) is FREE:
                self._resolve_free(inp, req if req is not None else REPLICATE, node)
                if req is None:
                    s.inputs[inp] = self.place[inp]
            elif req is None:
                s.inputs[inp] = self.place.get(inp, REPLICATE)
        self.place[node] = s.output
        self.inputs[node] = s.inputs
        if s.fallback:
            self.fallback[node] = s.fallback
        self._track_seeds(node, s)

    def _resolve_free(self, node: Node, req, consumer: Node) -> None:
        if self.place.get(node) is not FREE:
            return
        if node.op == "get_attr":
            # weights are stored whole or split; one consumed as a partial sum is stored whole
            self.place[node] = req if isinstance(req, Shard) else REPLICATE
            self.seeds[node] = frozenset([consumer]) if consumer.target in self.d.seed_ops else frozenset()
            return
        inv = inverse_of(node)
        wanted = inv(node, req) if inv is not None and isinstance(req, Placement) else None
        for inp in tensor_args(node):
            self._resolve_free(inp, (wanted or {}).get(inp, REPLICATE), consumer)
        self._apply(node)

    def _track_seeds(self, node: Node, s) -> None:
        out = s.output
        sharded_out = isinstance(out, Shard) or out is PARTIAL or (
            isinstance(out, tuple) and any(isinstance(p, Shard) or p is PARTIAL for p in out)
        )
        if not sharded_out:
            return
        seeds: frozenset = frozenset()
        grew = False
        split_out = isinstance(out, Shard) or isinstance(out, tuple)
        for inp, req in s.inputs.items():
            actual = self.place.get(inp)
            # a split output owes its split to split inputs: a partial sum that joins it (the
            # output of a row-parallel block added to a split residual) closed its own region
            carried = isinstance(actual, Shard) or isinstance(actual, tuple) or (actual is PARTIAL and not split_out)
            kept = carried and (isinstance(req, Shard) or req is PARTIAL)
            if kept and not self.is_weight(inp):
                seeds |= self.seeds.get(inp, frozenset())
                grew = True
        if node.target is operator.getitem:
            seeds |= self.seeds.get(node.args[0], frozenset())
            grew = True
        if not grew and node.target in self.d.seed_ops:
            seeds = frozenset([node])
        self.seeds[node] = seeds

    # inspection -----------------------------------------------------------------------------
    def edges(self):
        for node, reqs in self.inputs.items():
            for inp, req in reqs.items():
                yield node, inp, self.place.get(inp), req


def _weight_node(node: Node) -> Node | None:
    """The weight (a get_attr of 2 or more dims, through views of it) a matmul or embedding reads."""
    for a in node.args:
        n = a
        while isinstance(n, Node) and n.op == "call_function" and n.target in WEIGHT_TRANSPARENT:
            n = n.args[0]
        if isinstance(n, Node) and n.op == "get_attr" and ndim(n) >= 2:
            return n
    return None


def _weight_name(node: Node) -> str:
    w = _weight_node(node)
    return w.target if w is not None else ""


def _request(rnd: _Round, node: Node, wanted: Shard) -> dict[Node, Shard] | None:
    """Seed layouts that would make ``node`` come out as ``wanted``; None if no seed can.

    The request is carried back from ``node`` through views, elementwise ops and cuts, latest
    node first, so that a value read along several paths (``k * cos + rotate_half(k) * sin``)
    gets one layout that serves all of them: the union of what each path asks of it."""
    pending: dict[Node, Shard] = {node: wanted}
    out: dict[Node, Shard] = {}
    while pending:
        n = max(pending, key=rnd.order.__getitem__)
        w = pending.pop(n)
        needed = _needed(rnd, n, w)
        if needed is None:
            return None
        if needed == "seed":
            out[n] = w
            continue
        for inp, q in needed.items():
            actual = rnd.place.get(inp)
            if rnd.is_weight(inp):
                continue  # weights are placed afresh every round
            if isinstance(q, Shard) and q.is_whole and isinstance(actual, Shard) and q.dim != actual.dim:
                # all of it on every rank is the same along any dim: ask along the one it is split on
                q = whole_everywhere(actual.dim, actual.size, q.world)
            if inp in pending:
                q = union_layout(pending[inp], q)
                if q is None:
                    return None
            elif actual == q or not isinstance(q, Shard) or not isinstance(actual, Shard):
                if isinstance(actual, Shard) and not isinstance(q, Shard):
                    return None
                continue
            pending[inp] = q
    return out


def _needed(rnd: _Round, node: Node, wanted: Shard):
    """``"seed"`` when ``node`` is a split matmul that can simply be stored as ``wanted``, else the
    layouts its inputs need (None: none can)."""
    if node.target in rnd.d.matmuls and rnd.seeds.get(node) == frozenset([node]):
        return "seed" if wanted.dim == feature_dim(node) and wanted.covers_all else None
    cut = invert_cut(node, wanted, _cut_base(rnd, node))
    if cut is not None:
        return {cut[0]: cut[1]}
    inv = inverse_of(node)
    return None if inv is None else inv(node, wanted)


def _cut_base(rnd: _Round, node: Node):
    """The layout the cut that made ``node`` took its input in (what the other pieces keep)."""
    cut = node.args[0] if node.target is operator.getitem else node
    if not isinstance(cut, Node) or not cut.args or not isinstance(cut.args[0], Node):
        return None
    x = cut.args[0]
    taken = rnd.inputs.get(cut, {}).get(x)
    return taken if isinstance(taken, Shard) else rnd.place.get(x)


def _reduce_point(rnd: _Round, node: Node) -> Node:
    """Where a partial sum that must be reduced is best reduced: the smallest value on the way
    back to the op that made it partial, through ops that only carry it along (casts, scaling,
    picking rows, summing the top-k experts' outputs of a token), the earliest of equal ones; an
    op that adds several partial sums is kept so that one all-reduce serves them all (parallel
    attention + MLP)."""
    chain = [node]
    while True:
        # partial inputs that were partial already (not a bias made partial for the op)
        carried = [i for i, q in rnd.inputs.get(node, {}).items() if q is PARTIAL and rnd.place.get(i) is PARTIAL]
        if len(carried) != 1:
            break
        node = carried[0]
        chain.append(node)
    sizes = [static_numel(n) if is_tensor_node(n) else None for n in chain]
    if any(n is None for n in sizes):
        return chain[-1]
    return chain[min(range(len(chain)), key=lambda i: (sizes[i], -i))]  # ties: the earliest op


def _resolve(rnd: _Round, d: _Decisions) -> bool:
    """Adjust decisions for the bad edges of a round; True if anything changed."""
    changed = False
    reverts: list[tuple] = []  # (seeds, why), applied once every request of the round is in
    set_now: dict[Node, Shard] = {}
    for node, inp, actual, req in rnd.edges():
        if actual is PARTIAL and req is not PARTIAL:
            point = _reduce_point(rnd, inp)
            if point not in d.reduce_early:
                d.reduce_early.add(point)
                changed = True
            continue
        if actual is REPLICATE and isinstance(req, Shard) and _swallows(rnd, node, inp):
            reverts.append((rnd.seeds.get(node, ()), f"it would split the replicated {inp.name} at {node.name}"))
            continue
        if actual == req or actual is None or not isinstance(actual, Shard):
            continue
        if req is REPLICATE:
            if node.op == "output":
                continue
            if rnd.is_weight(inp):
                why = f"its weight is also used whole by {node.name} ({module_path(node)})"
                reverts.append((rnd.seeds.get(inp, ()), why))
                continue
            reason = rnd.fallback.get(node) or f"{op_name(node)} needs it whole"
            reverts.append((rnd.seeds.get(inp, ()), f"its output is gathered before {node.name} ({reason})"))
        elif isinstance(req, Shard):
            if rnd.is_weight(inp) or holds_all_of(actual, req):
                continue  # weights are placed afresh every round; a superset converts locally
            wanted = _request(rnd, inp, req)
            if wanted and all(s not in d.forced or d.mode.get(s) == "colwise" for s in wanted):
                progress = False
                for s, layout in wanted.items():
                    if s in set_now:  # several consumers asked this round: a layout for both
                        layout = _merge_requests(set_now[s], layout)
                    if d.layout.get(s) != layout and layout not in d.tried.setdefault(s, set()):
                        d.layout[s] = set_now[s] = layout
                        progress = changed = True
                    elif s in set_now:
                        progress = True
                if progress:
                    continue
            reverts.append((rnd.seeds.get(inp, ()), f"{node.name} needs it in another layout"))
    # a split whose layout was just refined is given the next round to show whether that helps
    # (the refinement an op further on asked for may be what another op needed too); layouts
    # are never tried twice, so each split is refined finitely often before it may be reverted
    for s, layout in set_now.items():
        d.tried[s].add(layout)
    for seeds, why in reverts:
        for s in seeds:
            if s in d.forced or d.mode.get(s) in ("replicate", NO_COLUMN) or s in set_now:
                continue
            # a matmul loses its column split only: should its input arrive split later (the
            # region before it was reverted for reasons of its own and recovers), it can still
            # close that region row-parallel, so one revert never spreads to its neighbours
            d.mode[s] = NO_COLUMN if s.target in d.matmuls else "replicate"
            d.why[s] = why
            d.layout.pop(s, None)
            changed = True
    return changed


def _merge_requests(a: Shard, b: Shard) -> Shard:
    """One layout for two consumers' requests of one split: segmented at the bounds of both
    (several cuts of one fused output), else the one whose every rank holds what the other
    needs (a key/value segment whole on every rank also serves a rotary's halves), else ``b``."""
    merged = _merge_segments(a, b)
    if merged is not None:
        return merged
    return a if holds_all_of(a, b) else b


def _merge_segments(a: Shard, b: Shard) -> Shard | None:
    """One layout segmented at the bounds of both, when both are segmented layouts."""
    try:
        for s in (a, b):
            if s != Shard.segmented(s.dim, s.size, s.world, s.segment_starts()):
                return None
        return Shard.segmented(a.dim, a.size, a.world, tuple(set(a.segment_starts()) | set(b.segment_starts())))
    except ValueError:
        return None


def _swallows(rnd: _Round, node: Node, inp: Node) -> bool:
    """A sharded region that would split a replicated activation of its own size on the way
    (``residual + column_output``) has no row-parallel matmul to close it: the residual stream
    itself would become sharded, and every layer after it would pay for that."""
    if rnd.is_weight(inp) or not inp.meta.get(REQUIRES_GRAD) or _rows_of_weight(inp):
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.pointwise not in tags and node.target not in EXTRA_ELEMENTWISE:
        return False
    return is_tensor_node(node) and tuple(shape(inp)) == tuple(shape(node))


_PICKS = {aten.index.Tensor, aten.index_select.default, aten.select.int, aten.slice.Tensor, aten.embedding.default}


def _rows_of_weight(node: Node) -> bool:
    """Rows picked out of a parameter (each token's expert's bias): a weight, not a residual."""
    while isinstance(node, Node) and node.op == "call_function" and (node.target in _PICKS or node.target in WEIGHT_TRANSPARENT):
        node = node.args[0]
    return isinstance(node, Node) and node.op == "get_attr"


def plan_sharding(gm: GraphModule, ctx: PlanContext, *, max_rounds: int = 64) -> GraphModule:
    d = _Decisions()
    for node in gm.graph.nodes:
        if node.target in d.seed_ops:
            style = ctx.override_for(module_path(node), _weight_name(node))
            if style is not None:
                if node.target in EMBEDDINGS and style == "rowwise":
                    style = "vocab"  # an embedding split by rows is split by vocabulary
                d.mode[node] = style
                d.forced.add(node)
                d.why[node] = "user override"
    user_dep = user_dependent(gm)
    if ctx.world == 1:
        rnd = _Round(gm, 1, d, user_dep)
        for n in gm.graph.nodes:
            if n.target in d.seed_ops:
                d.mode[n] = "replicate"
                d.why[n] = "tp=1"
        rnd.run()
    else:
        rnd = _settle(gm, ctx, d, user_dep, max_rounds)
        d, rnd = _pair_bottlenecks(gm, ctx, d, rnd, user_dep, max_rounds)
    _annotate(gm, ctx, rnd, d)
    gm.graph.lint()
    return gm


def _settle(gm: GraphModule, ctx: PlanContext, d: _Decisions, user_dep, max_rounds: int) -> _Round:
    """Rounds of propagation and adjustment until nothing changes."""
    for _ in range(max_rounds):
        rnd = _Round(gm, ctx.world, d, user_dep, ctx.options.fixed_weights).run()
        if not _resolve(rnd, d):
            return rnd
    ctx.warnings.append(f"the sharding plan did not settle in {max_rounds} rounds; "
                        "it is correct but may communicate more than needed")
    return rnd


def _pair_bottlenecks(gm, ctx, d: _Decisions, rnd: _Round, user_dep, max_rounds: int):
    """The greedy plan splits a low-rank down-projection by columns and its up-projection by rows;
    the other pairing keeps the small one whole and splits the big one by its outputs (multi-head
    latent attention's q and kv). Plan the pairs the other way, keep those whose up-projection
    then stays split, and take that plan if it communicates less."""
    pairs = _bottlenecks(rnd, d)
    for _ in range(2):
        if not pairs:
            break
        trial = d.copy()
        for a, (_, why) in pairs.items():
            trial.mode[a], trial.why[a] = NO_COLUMN, why
        other = _settle(gm, ctx, trial, user_dep, max_rounds)
        kept = {a: bw for a, bw in pairs.items() if isinstance(other.place.get(bw[0]), Shard)}
        if kept == pairs:
            return (trial, other) if _traffic(other) < _traffic(rnd) else (d, rnd)
        pairs = kept  # some up-projections could not stay split: never trade memory for nothing
    return d, rnd


def _bottlenecks(rnd: _Round, d: _Decisions) -> dict[Node, tuple[Node, str]]:
    """Column-split matmuls whose split is closed by a row-parallel matmul with more outputs than
    the first has (``x -> A (r) -> norm -> B (n)``, r below both the input width and n): a
    low-rank bottleneck, where the greedy pairing all-reduces B's wide output."""
    out = {}
    for b in rnd.gm.graph.nodes:
        if b.target not in d.matmuls or rnd.place.get(b) is not PARTIAL or b in d.forced:
            continue
        x = next((i for i in tensor_args(b) if not rnd.is_weight(i)), None)
        seeds = rnd.seeds.get(x, frozenset()) if x is not None else frozenset()
        if len(seeds) != 1:
            continue
        (a,) = seeds
        if a.target not in d.matmuls or a in d.forced or not isinstance(rnd.place.get(a), Shard):
            continue
        wa, wb = _weight_node(a), _weight_node(b)
        if wa is None or wb is None or ndim(wa) != 2 or ndim(wb) != 2:
            continue
        r = static(shape(a)[feature_dim(a)])
        h = static_numel(wa) // r if r and static_numel(wa) else None
        n = static(shape(b)[feature_dim(b)])
        if r and h and n and r < h and r < n:
            out[a] = (b, f"a low-rank bottleneck ({h} -> {r} -> {n}): whole, so that {b.name} splits its {n} outputs")
    return out


def _traffic(rnd: _Round) -> int:
    """Bytes the plan of a round sends per step (forward and backward): the collective
    ``insert_collectives`` would put on each edge whose placements differ, and the backward
    all-reduce of a whole value a split op reads."""
    total = 0
    for node, inp, actual, req in rnd.edges():
        if actual is None or actual is FREE or req is FREE or rnd.is_weight(inp) or static_numel(inp) is None:
            continue
        conv = conversion(actual, req)
        out = rnd.place.get(node)
        split = any(isinstance(p, Shard) or p is PARTIAL for p in (out if isinstance(out, tuple) else (out,)))
        if conv is None and actual is REPLICATE and split and inp.meta.get(REQUIRES_GRAD):
            conv = (None, (), "copy_to_tp")
        if conv is not None:
            info = comm_info(conv[2], inp.meta["val"], rnd.world, actual, req)
            total += info.bytes + info.bwd_bytes
    return total


def _annotate(gm: GraphModule, ctx: PlanContext, rnd: _Round, d: _Decisions) -> None:
    for node in gm.graph.nodes:
        p = rnd.place.get(node)
        node.meta[PLACEMENT] = REPLICATE if p is FREE else p
        if node in rnd.inputs:
            node.meta[INPUTS] = {inp.name: (REPLICATE if q is FREE else q) for inp, q in rnd.inputs[node].items()}
        if node.op == "get_attr" and isinstance(node.meta[PLACEMENT], Placement):
            ctx.param_placements[node.target] = node.meta[PLACEMENT]
        if node.target in d.seed_ops:
            text = _decision_text(node, node.meta[PLACEMENT], d, rnd.user_dep)
            node.meta[DECISION] = text
            key = module_path(node) or node.name
            if key in ctx.decisions:
                key = f"{key}:{node.name}"
            ctx.decisions[key] = text
            weight = _weight_name(node)
            # a fallback: the planner turned a split its op could make back (not tp=1, not the user)
            fallback = node in d.why and node not in d.forced and node.meta[PLACEMENT] is REPLICATE
            if weight and ctx.world > 1 and fallback:
                ctx.replicated.append(Replicated(weight, static_numel(_weight_node(node)) or 0, module_path(node),
                                                 node.name, source_line(node), d.why[node]))
    for node, inp, actual, req in rnd.edges():
        if isinstance(actual, Shard) and req is REPLICATE and node.op != "output":
            reason = rnd.fallback.get(node, "needs the whole tensor")
            node.meta[FALLBACK] = reason
            ctx.warnings.append(
                f"gathering sharded {inp.name} to replicate before it is used: {reason}\n  {describe_node(node)}"
            )


def _decision_text(node: Node, out, d: _Decisions, user_dep=()) -> Decision:
    if out is PARTIAL:
        return Decision("vocab" if node.target in EMBEDDINGS else "rowwise")
    if isinstance(out, Shard):
        features = feature_dim(node) if node.target in d.matmuls else ndim(node) - 1
        return Decision("colwise" if out.dim == features else f"follows input S({out.dim})")
    why = d.why.get(node)
    if why is None and node.target in EMBEDDINGS and node.args[1] not in user_dep and not d.mode.get(node):
        why = "looked up by computed positions, not the input's ids: whole, as an all-reduce would cost more"
    return Decision("replicate", why)
