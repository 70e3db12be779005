"""Pass (analysis): the regions whose activations backward recomputes instead of keeping.

Reads ``ctx.options.recompute`` (and ``memory_limit`` for ``"auto"``), the stages of
``ctx.pipeline`` and ``fxpar_memory`` (bytes and FLOPs per node). Writes ``fxpar_recompute`` (the
region's name) on every node of a chosen region, each stage's memory again (``StageMemory``:
activations without what the regions kept, ``recomputed``: the largest region's activations
remade during backward, ``recompute_flops``) and ``ctx.recomputed`` (the regions, in order).

Regions come from the graph, never from names:

* an attention core (``"selective"``, Megatron's selective recomputation): the ops from the
  matmul of queries and keys through the softmax (and its mask, scale and dropout) to the matmul
  with the values; a fused attention op alone. What it keeps grows with the sequence squared
  (Korthikanti et al.'s ``5as/h`` term), what it costs to remake is small.
* a layer (``"full"``): every op of one of a run of sibling modules of one class (``h.0``,
  ``h.1``, ...: the blocks of a ``ModuleList``), recomputed from its input.
* ``"auto"``: on each device over ``memory_limit``, the regions with the fewest recomputed FLOPs
  per byte they free, one at a time until it fits, among runs of ops without matmuls inside a
  layer (activations, gates, a norm's arithmetic: node level), attention cores, the modules right
  inside each layer (its norms, attention, MLP) and the layers; a region chosen takes in those
  inside it. What costs no matmul FLOPs goes first, attention cores next, as a rule. A device
  that does not fit when nothing more helps is an error.

The memory model (``fxpar/memory.py``) counts a region's inputs as kept, and during backward the
activations it remakes on top of what the ops before it still keep (``RegionMemory``); the
estimate equals what autograd keeps and what a remake keeps, measured on CPU runs
(``tests/test_recompute.py``).

A region is cut at stage boundaries, and skipped where an op outside it between its first and
last op reads its output (there is no one place to run it).
"""

from __future__ import annotations

import heapq
import operator

import torch
from torch.fx import GraphModule, Node

from fxpar.blocks import innermost, is_fxpar_op, owners, repeated_blocks, stack
from fxpar.errors import PlanError
from fxpar.memory import evaluate, node_memory, per_device, stage_memory
from fxpar.metadata import RECOMPUTE, STAGE
from fxpar.plan_context import PlanContext

aten = torch.ops.aten
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.mm.default, aten.einsum.default}
FUSED = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default}


def plan_recompute(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    mode = ctx.options.recompute
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cores, layers = _valid(attention_cores(gm), order), _valid(layer_regions(gm), order)
    if mode == "selective":
        chosen = dict(cores)
    elif mode == "full":
        chosen = dict(layers)
    else:
        chains, modules = _valid(free_chains(gm), order), _valid(sublayer_regions(gm), order)
        # greedy from two pools (with and without the node-level runs, which can steer it away
        # from a cheaper set of modules); the fitting choice with fewer FLOPs wins
        tries = [_fit(gm, ctx, {**chains, **cores, **modules, **layers}), _fit(gm, ctx, {**cores, **modules, **layers})]
        chosen = min(tries, key=lambda c: (not _fits(gm, ctx, c), _flops(ctx, c)))
    _mark(gm, chosen)
    _restage(gm, ctx)
    ctx.recomputed = list(chosen)
    if ctx.options.memory_limit is not None:
        _check(ctx, mode)
    return gm


def attention_cores(gm: GraphModule) -> dict[str, list[Node]]:
    """``{"<module> attention core": its nodes}`` for every softmax between two matmuls and
    every fused attention op."""
    out: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in FUSED:
            region = [node] + [u for u in node.users if u.target is operator.getitem]
        elif node.target in SOFTMAX:
            region = _softmax_core(node)
        else:
            continue
        if region:
            name = f"{innermost(node)} attention core"
            out[name if name not in out else f"{name} {len(out)}"] = region
    return out


def _softmax_core(softmax: Node) -> list[Node] | None:
    back, x = [], softmax.args[0]
    for _ in range(16):  # scale, mask, bias: a few elementwise ops back to the scores' matmul
        if not isinstance(x, Node) or x.op != "call_function":
            return None
        back.append(x)
        if x.target in MATMUL:
            break
        inputs = [i for i in x.all_input_nodes if isinstance(i.meta.get("val"), torch.Tensor)]
        if not inputs:
            return None
        x = max(inputs, key=lambda i: i.meta["val"].numel())
    else:
        return None
    ahead, y = [], softmax
    for _ in range(8):  # dropout, casts: on to the matmul with the values
        users = [u for u in y.users if u.op == "call_function"]
        if len(users) != 1:
            return None
        y = users[0]
        ahead.append(y)
        if y.target in MATMUL:
            return [*reversed(back), softmax, *ahead]
    return None


def layer_regions(gm: GraphModule) -> dict[str, list[Node]]:
    """``{module path: its nodes}`` for the repeated blocks (``fxpar/blocks.py``:
    ``transformer.h.0``, ``transformer.h.1``, ...)."""
    return _regions_by_module(gm, repeated_blocks(gm))


def sublayer_regions(gm: GraphModule) -> dict[str, list[Node]]:
    """``{module path: its nodes}`` for the modules right inside each block (``transformer.h.0.attn``,
    ``transformer.h.0.mlp``, ...): the finer choices of ``"auto"``."""
    blocks = repeated_blocks(gm)
    inner = {path for node in gm.graph.nodes for path, _ in stack(node) if path.rpartition(".")[0] in blocks}
    return _regions_by_module(gm, inner)


def free_chains(gm: GraphModule) -> dict[str, list[Node]]:
    """``{"<block> ops <first>..<last>": nodes}``: inside each block, the runs of consecutive ops
    that cost no matmul FLOPs (activations, gates, norms' arithmetic, dropout), the node-level
    choices of ``"auto"``: remade for next to nothing, they free what they save beyond their
    inputs. Collectives end a run (remaking one would send its bytes again)."""
    blocks = repeated_blocks(gm)
    owner = owners(gm, blocks)
    # a run stays inside one module of the block (or the block's own ops), so that it nests in
    # the coarser regions instead of straddling two of them
    part = owners(gm, {p for n in gm.graph.nodes for p, _ in stack(n) if p.rpartition(".")[0] in blocks})
    out: dict[str, list[Node]] = {}
    run: list[Node] = []

    def close():
        if len(run) > 1 or (run and node_memory(run[0]).saved_new):
            out[f"{part.get(run[0]) or owner[run[0]]} ops {run[0].name}..{run[-1].name}"] = list(run)
        run.clear()

    for node in gm.graph.nodes:
        block = owner.get(node)
        cheap = (node.op == "call_function" and block is not None and not is_fxpar_op(node.target)
                 and not node_memory(node).flops)
        if not cheap or (run and (owner[run[0]], part.get(run[0])) != (block, part.get(node))):
            close()
        if cheap:
            run.append(node)
    close()
    return out


def _regions_by_module(gm: GraphModule, paths: set[str]) -> dict[str, list[Node]]:
    owner = owners(gm, paths)
    out: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if owner.get(node) is not None:
            out.setdefault(owner[node], []).append(node)
    return out


def _valid(regions: dict, order: dict) -> dict:
    """The regions that can run as one call: cut at stage boundaries, none whose output an op
    outside it, between its first and last op, reads."""
    out = {}
    for name, nodes in regions.items():
        by_stage: dict = {}
        for n in nodes:
            by_stage.setdefault(_stage_of(n), []).append(n)
        if None in by_stage and len(by_stage) > 1:  # ops every stage can remake go with the region
            by_stage[min(k for k in by_stage if k is not None)][:0] = by_stage.pop(None)
        for stage, part in by_stage.items():
            key = name if len(by_stage) == 1 else f"{name} (stage {stage})"
            inside = set(part)
            last = max(order[n] for n in part)
            reads_early = any(u not in inside and order[u] < last for n in part for u in n.users)
            if not reads_early and any(node_memory(n).saved_new or node_memory(n).saved_roots for n in part):
                out[key] = part
    return out


def _stage_of(node: Node, depth: int = 0):
    """The stage ``node`` runs in: its own, its producer's (a getitem), else its first reader's."""
    if STAGE in node.meta:
        return node.meta[STAGE]
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        return _stage_of(node.args[0], depth + 1)
    for u in node.users:
        if depth < 8 and (stage := _stage_of(u, depth + 1)) is not None:
            return stage
    return None


def _mark(gm: GraphModule, chosen: dict) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(RECOMPUTE, None)
    for name, nodes in chosen.items():
        for n in nodes:
            n.meta[RECOMPUTE] = name


def _restage(gm: GraphModule, ctx: PlanContext, stages=None) -> None:
    """The memory of ``stages`` (default: every stage) with the regions marked now."""
    all_nodes = {n.name: n for n in gm.graph.nodes}
    weights = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    holding = ctx.holding()
    for s in ctx.pipeline.stages if stages is None else stages:
        nodes = [all_nodes[x] for x in s.nodes] + [weights[p] for p in s.params]
        mem = stage_memory(nodes, all_nodes, ctx.options.optimizer, held=s.inputs + s.outputs,
                           optimizer_dtype=ctx.options.optimizer_dtype, holding=holding)
        mem.in_flight = s.memory.in_flight
        s.memory = mem


def _peaks(ctx: PlanContext) -> list[float]:
    stages = ctx.pipeline.stages
    devices = per_device([s.memory for s in stages], [s.rank for s in stages])
    return [float(evaluate(d.peak, ctx.pipeline.sizes, ctx.dim_names)) for d in devices]


def _fit(gm: GraphModule, ctx: PlanContext, candidates: dict) -> dict:
    """``"auto"``: regions chosen one at a time, fewest recomputed FLOPs per byte freed first,
    on the devices over the limit, until each fits (or nothing more helps). A region inside one
    chosen (a core in its layer) is dropped.

    Greedy with lazy updates: a region's FLOPs per byte only grow as others are chosen (what it
    would free is partly freed already), so the score it had is a bound; the best is taken when
    its score, measured again, still beats every other's bound. Then each region that is no
    longer needed to fit goes again, the costliest first. Each measurement restages only the
    stages of the region's device."""
    limit = ctx.options.memory_limit
    stages = ctx.pipeline.stages
    rank_of = {s.index: s.rank for s in stages}
    on = {r: [s for s in stages if s.rank == r] for r in set(rank_of.values())}
    chosen: dict = {}
    _mark(gm, chosen)
    _restage(gm, ctx)
    peaks = _peaks(ctx)
    device = {name: rank_of.get(_stage_of(nodes[0]), 0) for name, nodes in candidates.items()}
    flops = {name: _flops(ctx, {name: nodes}) for name, nodes in candidates.items()}

    def score(name):
        """FLOPs per byte freed on the region's device with it chosen too; None if it frees nothing."""
        r = device[name]
        _mark(gm, _outermost({**chosen, name: candidates[name]}))
        _restage(gm, ctx, on[r])
        after = _peaks(ctx)[r]
        freed = peaks[r] - after
        return (flops[name] / freed, after) if freed > 0 else None

    sets = {name: set(nodes) for name, nodes in candidates.items()}

    def crosses(name):  # overlaps a chosen region without one holding the other: no one call runs both
        return any(sets[name] & sets[c] and not (sets[name] <= sets[c] or sets[c] <= sets[name]) for c in chosen)

    heap = []
    for i, name in enumerate(candidates):
        if peaks[device[name]] > limit and (s := score(name)) is not None:
            heap.append((s[0], i, name))
    heapq.heapify(heap)
    while heap and any(p > limit for p in peaks):
        _, i, name = heapq.heappop(heap)
        if peaks[device[name]] <= limit or crosses(name):
            continue
        s = score(name)
        if s is None:
            continue
        if heap and s[0] > heap[0][0]:  # another may do better now: measure it first
            heapq.heappush(heap, (s[0], i, name))
            continue
        chosen[name] = candidates[name]
        peaks[device[name]] = s[1]
    chosen = _outermost(chosen)
    # a region the later ones made unneeded goes again, the costliest first
    for name in sorted(chosen, key=lambda n: -flops.get(n, 0.0)):
        if not flops.get(name):
            continue
        trial = {k: v for k, v in chosen.items() if k != name}
        _mark(gm, trial)
        _restage(gm, ctx, on[device[name]])
        if _peaks(ctx)[device[name]] <= limit:
            chosen = trial
    _mark(gm, chosen)
    return chosen


def _outermost(regions: dict) -> dict:
    """The regions not inside another of them."""
    sets = {name: set(nodes) for name, nodes in regions.items()}
    return {name: nodes for name, nodes in regions.items()
            if not any(other != name and len(sets[other]) > len(sets[name]) and sets[name] <= sets[other]
                       for other in sets)}


def _fits(gm: GraphModule, ctx: PlanContext, chosen: dict) -> bool:
    _mark(gm, chosen)
    _restage(gm, ctx)
    return max(_peaks(ctx)) <= ctx.options.memory_limit


def _flops(ctx: PlanContext, regions: dict) -> float:
    """The forward FLOPs of remaking ``regions``, at the sizes planned for."""
    total = sum(node_memory(n).flops for nodes in regions.values() for n in nodes)
    return float(evaluate(total, ctx.pipeline.sizes, ctx.dim_names))


def _check(ctx: PlanContext, mode: str) -> None:
    peaks = _peaks(ctx)
    worst = max(peaks)
    if worst > ctx.options.memory_limit:
        gib = 1 << 30
        raise PlanError(
            f"with recompute={mode!r} pipeline rank {peaks.index(worst)} needs {worst / gib:.3f} GiB, over "
            f"memory_limit={ctx.options.memory_limit / gib:.3f} GiB. "
            + ("" if mode in ("full", "auto") else "Recompute more (recompute='full' or 'auto'), ")
            + "use zero to split weights and optimizer state over dp, more tp or pp ranks, or smaller microbatches"
        )
