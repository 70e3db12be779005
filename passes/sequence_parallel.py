"""Pass (analysis): sequence parallelism (Megatron style) — the activations that tensor
parallelism leaves replicated between its blocks are split along the sequence instead.

Runs after ``plan_sharding`` when ``ctx.options.sequence_parallel`` is set (and tp > 1).
Reads ``val``, ``fxpar_placement``, ``fxpar_inputs``, ``fxpar_requires_grad`` and
``fxpar_decision``. Rewrites ``fxpar_placement`` and ``fxpar_inputs`` of the nodes it moves
into the *stream* (the norms, residual adds, dropouts and other token-wise work between
tensor-parallel blocks) and fills ``ctx.sequence_split`` (node name -> placement). Weights are
not touched: the tensor-parallel decisions stay as ``plan_sharding`` made them.

What it guarantees. A node joins the stream only when its own sharding rule, given its stream
inputs split along the token dim, keeps them as they are and splits its output (a norm over the
hidden size, a pointwise op, a view that keeps the token dim): the decision comes from the data
flow and the op rules, not from layer names. A stream starts at a replicated activation whose
inputs are a partial sum or a replicated activation of its own shape (``x + attn_out``, the
embedding's output), split along dim ``ndim - 2`` (the sequence of ``(B, T, C)``, the tokens
of ``(B*T, C)``). Where a stream value meets an op that needs it whole (the input of a
column-parallel matmul, attention, the model's output), ``insert_collectives`` all-gathers it;
where a partial sum enters the stream it is reduce-scattered instead of all-reduced; a
replicated value entering it is sliced. Per transformer layer this is Megatron's
reduce-scatter + all-gather in place of each all-reduce: the same bytes, with the stream's
activations divided by tp. Every conversion is explicit, so any stream the rules accept
computes the single-device function.

The gathered input of a column-parallel block is kept whole for backward unless
``recompute_gathers`` asks ``passes/recompute_gathers.py`` to keep its shard instead.

A token dim that is symbolic or not divisible by tp cannot be split evenly: those values stay
replicated, and a plan in which nothing could be split is an error that says why.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxpar.errors import PlanError
from fxpar.metadata import DECISION, INPUTS, PLACEMENT, REQUIRES_GRAD, splits_output
from fxpar.placement import PARTIAL, REPLICATE, Placement, Shard
from fxpar.plan_context import PlanContext
from fxpar.rules import SplitRuleContext, inverse_of, is_weight, rule_for, user_dependent
from fxpar.rules.base import is_tensor_node, ndim, shape, static, tensor_args
from fxpar.rules.matmul import decidable_ops


class _StreamContext(SplitRuleContext):
    """The ``RuleContext`` a rule sees when asked whether its node can join the stream: the
    stream's placements for stream inputs, the plan's for everything else."""

    def __init__(self, world: int, user_dep: set[Node]):
        super().__init__(world, user_dep)
        self.node: Node | None = None
        self.split_ok = False  # may the node's replicated weight run on the stream's tokens

    def placement(self, node):
        if not isinstance(node, Node):
            return None
        if node in self.given:
            return self.given[node]
        # as the plan had this consumer take it (a partial sum reduced early reads as replicated)
        consumed = (self.node.meta.get(INPUTS) or {}).get(node.name)
        return consumed if consumed is not None else node.meta.get(PLACEMENT, REPLICATE)

    def decision(self, node: Node) -> str:
        text = node.meta.get(DECISION, "auto")
        if text.startswith("replicate"):
            # a replicated weight may run on the stream's slice of the tokens, unless its input
            # is gathered for another op anyway (keys beside the column-parallel queries)
            return "auto" if node is self.node and self.split_ok else "replicate"
        return text if text in ("colwise", "rowwise", "vocab") else "auto"


def _split_pays(matmul: Node, given: dict[Node, Placement], world: int, user_dep: set[Node]) -> bool:
    """Whether a matmul with a replicated weight should run on the stream's slice of the tokens.

    Its weight gradient then becomes a sum over the ranks (an all-reduce of the weight's size in
    backward) in place of gathering its input (one all-gather of the input's size): it pays when
    the input is more than twice the weight, and no other reader needs the input whole anyway
    (the keys of a replicated key projection beside column-parallel queries, a router's input
    that the experts index)."""
    probe = _StreamContext(world, user_dep)
    for inp, place in given.items():
        for user in inp.users:
            if user is matmul or user.op != "call_function":
                continue
            probe.node, probe.given = user, {inp: place}
            s = rule_for(user)(user, probe)
            if s.inputs.get(inp, place) != place:
                return False
    weight = sum(_elements(a) or 0 for a in tensor_args(matmul) if is_weight(a))
    inputs = [_elements(a) for a in given]
    return all(n is not None for n in inputs) and 2 * weight < sum(inputs)


def _elements(node: Node) -> int | None:
    """Elements of a tensor node, symbolic sizes at the example's values (costs only compare)."""
    n = 1
    for d in shape(node):
        if isinstance(d, torch.SymInt):
            d = d.node.hint if d.node.has_hint() else None
        if d is None:
            return None
        n *= int(d)
    return n


def _shape_key(node: Node) -> tuple:
    return tuple(str(d) for d in shape(node))


def _weight_matmul(node: Node) -> bool:
    return node.target in decidable_ops() and any(is_weight(a) for a in tensor_args(node))


def _activation(node: Node, user_dep: set[Node]) -> bool:
    """A floating value computed from the user's input that carries a gradient."""
    if not is_tensor_node(node) or node not in user_dep or not node.meta.get(REQUIRES_GRAD):
        return False
    v = node.meta["val"]
    return v.is_floating_point() and v.dim() >= 2


def _token_split(node: Node, world: int) -> Shard | None:
    """The even split along the token dim (``ndim - 2``), if that dim allows one."""
    d = ndim(node) - 2
    size = static(shape(node)[d])
    if size is None or size % world:
        return None
    return Shard.even(d, size, world)


def _starts(node: Node, world: int, user_dep: set[Node], why: list[str], by_shape: dict) -> dict[Node, Placement]:
    """Inputs of ``node`` that a stream starting here would take split: partial sums and
    replicated activations, in the layout that makes the node's output split along its token
    dim (through a view: ``(B*T, C) -> (B, T, C)`` takes every batch's slice of the sequence),
    or in the layout the stream already gives values of this shape, so that the two meet
    without a conversion (a residual flattened to ``(B*T, C)`` added to this node)."""
    split = by_shape.get(_shape_key(node)) or _token_split(node, world)
    if split is None:
        why.append(f"{node.name}: token dim {ndim(node) - 2} of size {shape(node)[ndim(node) - 2]} does not split over {world} ranks")
        return {}
    inv = inverse_of(node)
    wanted = inv(node, split) if inv is not None else None
    given = {}
    for inp in tensor_args(node):
        if not _activation(inp, user_dep) or inp.meta.get(PLACEMENT) not in (REPLICATE, PARTIAL):
            continue
        if tuple(shape(inp)) == tuple(shape(node)):
            given[inp] = split
        elif wanted and isinstance(wanted.get(inp), Shard) and wanted[inp].is_partition:
            given[inp] = wanted[inp]
    return given


def _accepts(s, given: dict[Node, Placement]) -> bool:
    out = s.output
    if not (isinstance(out, Shard) and out.is_partition):
        return False
    return all(s.inputs.get(inp, p) == p for inp, p in given.items())


def _components(stream) -> dict[Node, list[Node]]:
    """The connected parts of the stream (joined where one stream value feeds another)."""
    parent = {n: n for n in stream}

    def root(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in stream:
        for inp in tensor_args(node):
            if inp in stream:
                parent[root(inp)] = root(node)
    parts: dict[Node, list[Node]] = {}
    for n in stream:
        parts.setdefault(root(n), []).append(n)
    return parts


def _drop_costly(stream: dict, new_inputs: dict, readers: dict) -> bool:
    """Drop the parts of the stream that would move more than plain TP does; True if any.

    A partial sum entering a part is reduce-scattered (the bytes of the all-reduce it replaces);
    the gather where a part meets a column-parallel block costs what that block's backward
    all-reduce did. What is extra: the backward all-gather of a replicated activation entering a
    part, and the gather of a value leaving a part for an op that is not split (the model's
    output, an index, keys a replicated projection makes). A part that no partial sum enters,
    or whose split values hold less than twice its extra elements (a single op between a
    reduce-scatter and an all-gather), stays replicated: it would move more and save little."""
    dropped = False
    for part in _components(stream).values():
        paid = extra = 0
        for node in part:
            for inp in tensor_args(node):
                if inp in stream or not isinstance(new_inputs[node].get(inp.name), Shard):
                    continue
                if inp.meta.get(PLACEMENT) is PARTIAL:
                    paid += 2 * (_elements(inp) or 0)
                elif inp.meta.get(REQUIRES_GRAD) and not is_weight(inp):
                    extra += _elements(inp) or 0
            whole_for = [u for u in node.users if u not in stream
                         and (readers.get(u) or u.meta.get(INPUTS) or {}).get(node.name) is REPLICATE]
            if any(u.op == "output" or not splits_output(u) for u in whole_for):
                extra += _elements(node) or 0
        held = sum(_elements(n) or 0 for n in part)
        if paid == 0 or held < 2 * extra:
            for node in part:
                del stream[node], new_inputs[node]
            dropped = True
    return dropped


def _readers(gm: GraphModule, stream: dict, rctx: _StreamContext) -> dict[Node, dict[str, Placement]]:
    """Ops outside the stream that take stream values (or partial sums the stream takes) as
    they are: their new input placements."""
    fed = dict(stream)
    fed.update({i: PARTIAL for n in stream for i in tensor_args(n) if i.meta.get(PLACEMENT) is PARTIAL})
    out = {}
    for node in gm.graph.nodes:
        if node not in stream and node.op == "call_function" and any(i in fed for i in node.all_input_nodes):
            adopted = _consumer_inputs(node, fed, rctx)
            if adopted is not None:
                out[node] = adopted
    return out


def _consumer_inputs(node: Node, stream: dict[Node, Placement], rctx: _StreamContext) -> dict[str, Placement] | None:
    """How an op outside the stream takes its stream inputs (and partial sums the stream takes
    reduce-scattered) when it can take them as they are and still give what the plan expects
    of it (a metadata check, a size query); None if it needs them as the plan had them (whole),
    so that they are gathered or reduced for it."""
    rctx.node, rctx.given = node, {i: stream[i] for i in tensor_args(node) if i in stream}
    s = rule_for(node)(node, rctx)
    if s.output != node.meta.get(PLACEMENT):
        return None
    before = node.meta.get(INPUTS) or {}
    after = {inp.name: s.inputs.get(inp, rctx.placement(inp)) for inp in tensor_args(node)}
    if any(after[name] != before.get(name) for name in after if name not in {i.name for i in rctx.given}):
        return None
    return after


def sequence_parallel(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    world = ctx.world
    user_dep = user_dependent(gm)
    rctx = _StreamContext(world, user_dep)
    stream: dict[Node, Placement] = {}
    new_inputs: dict[Node, dict[str, Placement]] = {}
    why: list[str] = []
    by_shape: dict[tuple, Shard] = {}  # the latest stream layout of each global shape
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _activation(node, user_dep) or node.meta.get(PLACEMENT) is not REPLICATE:
            continue
        given = {inp: stream[inp] for inp in tensor_args(node) if inp in stream}
        if not given:
            given = _starts(node, world, user_dep, why, by_shape)
            if not given:
                continue
        rctx.node, rctx.given = node, given
        rctx.split_ok = _weight_matmul(node) and _split_pays(node, given, world, user_dep)
        s = rule_for(node)(node, rctx)
        if not _accepts(s, given):
            continue
        stream[node] = by_shape[_shape_key(node)] = s.output
        new_inputs[node] = {inp.name: s.inputs.get(inp, rctx.placement(inp)) for inp in tensor_args(node)}
    readers = _readers(gm, stream, rctx)
    if _drop_costly(stream, new_inputs, readers):
        readers = _readers(gm, stream, rctx)
    if not stream:
        reason = "; ".join(dict.fromkeys(why)) or "no replicated activation lies between tensor-parallel blocks"
        raise PlanError(
            f"sequence_parallel=True, but no activation could be split along the sequence over tp={world}: {reason}. "
            "Use a sequence length divisible by tp (a static one: sequence parallelism needs even splits), "
            "or drop sequence_parallel."
        )
    new_inputs.update(readers)
    for node, reqs in new_inputs.items():
        node.meta[INPUTS] = reqs
    for node, place in stream.items():
        node.meta[PLACEMENT] = place
        ctx.sequence_split[node.name] = place
    gm.graph.lint()
    return gm
