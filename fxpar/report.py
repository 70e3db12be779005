"""Readable views of a plan: the node table, the summary, and annotated per-rank code."""

from __future__ import annotations


import torch
from tabulate import tabulate
from torch.fx import GraphModule

from .errors import module_path
from .memory import data_dependent_sizes
from .metadata import COMM, DECISION, FALLBACK, PLACEMENT
from .placement import Shard


def _short(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    name = str(target) if isinstance(target, torch._ops.OpOverload) else name
    return name.replace("aten.", "").replace(".default", "")


def _shape(val) -> str:
    if isinstance(val, torch.Tensor):
        return "(" + ", ".join(str(s) for s in val.shape) + ")"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in val) + ")"
    return ""


def local_shape(val, place) -> str:
    if isinstance(val, torch.Tensor) and isinstance(place, Shard):
        shape = [str(s) for s in val.shape]
        shape[place.dim] = str(place.local_size)
        return "(" + ", ".join(shape) + ")"
    if isinstance(val, (tuple, list)) and isinstance(place, tuple):
        return "(" + ", ".join(local_shape(v, p) for v, p in zip(val, place)) + ")"
    return _shape(val)


def fmt_bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_table(gm: GraphModule, ctx) -> str:
    rows = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        comm = node.meta.get(COMM)
        place = node.meta.get(PLACEMENT)
        rows.append(
            [
                node.name,
                {"placeholder": "input", "get_attr": "weight"}.get(node.op) or _short(node.target),
                module_path(node),
                _shape(node.meta.get("val")),
                "" if place is None else repr(place),
                local_shape(node.meta.get("val"), place),
                "" if comm is None else f"{comm_kind(comm)} {fmt_bytes(comm.bytes)} / {fmt_bytes(comm.bwd_bytes)}",
                node.meta.get(DECISION, "") or node.meta.get(FALLBACK, ""),
            ]
        )
    headers = ["node", "op", "module", "global shape", "placement", "local shape", "comm fwd / bwd per rank", "decision"]
    where = "placements on tp"
    if ctx.mesh.cp > 1:
        where += f"; shapes of one cp rank's 1/{ctx.mesh.cp} of the sequence"
    return f"plan for {ctx.mesh} ({where})\n" + tabulate(rows, headers=headers)


def comm_kind(info) -> str:
    """A collective's kind, with its mesh dimension unless it is tp (as the runtime counters say)."""
    return info.kind if info.group == "tp" else f"{info.group} {info.kind}"


def _balanced(n, routed: dict) -> str:
    """Bytes, with sizes known only at run time (tokens per expert) at a balanced router's
    load, marked ``~``."""
    free = {str(s) for s in getattr(n, "free_symbols", ())}
    if free & set(routed):
        value = n.subs({s: routed[str(s)] for s in n.free_symbols if str(s) in routed})
        return "~" + fmt_bytes(float(value) if value.is_number else value)
    return fmt_bytes(n)


def comm_totals(gm: GraphModule) -> dict[str, list]:
    totals: dict[str, list] = {}
    for node in gm.graph.nodes:
        c = node.meta.get(COMM)
        if c is None:
            continue
        t = totals.setdefault(comm_kind(c), [0, 0, 0])
        t[0] += 1
        t[1] += c.bytes
        t[2] += c.bwd_bytes
    return totals


def summary(gm: GraphModule, ctx) -> str:
    decisions: dict[str, int] = {}
    for text in ctx.decisions.values():
        key = getattr(text, "style", text)
        decisions[key] = decisions.get(key, 0) + 1
    lines = [f"mesh {ctx.mesh}; decisions: " + ", ".join(f"{k} x{v}" for k, v in sorted(decisions.items()))]
    if ctx.passes:
        lines.append("passes: " + ", ".join(ctx.passes))
    if ctx.sequence_split:
        dims = sorted({repr(p) for p in ctx.sequence_split.values()})
        lines.append(f"sequence parallel: {len(ctx.sequence_split)} values between TP blocks split by tokens ({', '.join(dims)})")
    if ctx.mesh.cp > 1:
        a2a = sum(1 for n in gm.graph.nodes if n.meta.get(COMM) and comm_kind(n.meta[COMM]) == "cp all_to_all")
        ring = sum(1 for n in gm.graph.nodes if n.meta.get(COMM) and comm_kind(n.meta[COMM]) == "cp ring")
        cp = ctx.mesh.cp
        how = (f"{ring} attentions pass key/value blocks around the ring (ring attention)" if ring else
               f"{a2a} all-to-alls switch attention to heads and back (Ulysses)")
        lines.append(f"context parallel: each of cp={cp} ranks holds 1/{cp} of the sequence in every layer; {how}")
    if ctx.expert_layers:
        ep = ctx.mesh.ep
        sizes = sorted({x.experts for x in ctx.expert_layers})
        forms = ", ".join(sorted({x.form for x in ctx.expert_layers}))
        lines.append(
            f"expert parallel: {len(ctx.expert_layers)} layers ({forms}), "
            + ", ".join(f"{e // ep} of {e} experts per ep rank" for e in sizes)
            + "; each layer's routed tokens go to their experts' ranks by an all-to-all and come back by another "
            f"(counts exchanged every step); the ep={ep} ranks are data-parallel replicas for the rest"
        )
    routed = data_dependent_sizes(gm)
    rows = [[k, n, _balanced(f, routed), _balanced(b, routed)] for k, (n, f, b) in sorted(comm_totals(gm).items())]
    if rows:
        lines.append(tabulate(rows, headers=["collective", "count", "fwd bytes/rank", "bwd bytes/rank"]))
    total, local = param_bytes(gm, ctx)
    if total and ctx.mesh.pp == 1:
        lines.append(f"parameters: {fmt_bytes(total)} in all, {fmt_bytes(local)} per rank ({local / total:.3f} of all)")
    if ctx.pipeline is not None:
        lines.append(stage_table(gm, ctx))
        lines.append(state_table(ctx))
    if ctx.options.recompute != "none":
        lines.append(recompute_report(gm, ctx))
    if ctx.pipeline is not None and ctx.mesh.pp > 1:
        lines.append(schedule_report(ctx))
    found = replicated_weights(gm, ctx) if ctx.mesh.tp > 1 else []
    if found:
        rows = [[r.weight, f"{s:.1%}", r.why] for r, s in found]
        lines.append("weights kept whole on every tp rank (fallbacks):\n"
                     + tabulate(rows, headers=["weight", "of params", "why"], maxcolwidths=[None, None, 80]))
    held = held_beyond_share(gm, ctx, skip={r.weight for r, _ in found}) if ctx.mesh.tp > 1 else []
    if held:
        rows = [[w, f"{s:.1%}", f"{f:.2f}", why] for w, s, f, why in held]
        table = tabulate(rows, headers=["weight", "of params", "per rank", "why"], maxcolwidths=[None, None, None, 70])
        lines.append(f"other weights over 1% of the model that a tp rank holds more than 1/{ctx.mesh.tp} of:\n{table}")
    if ctx.warnings:
        lines.append("warnings:\n" + "\n".join("  - " + w for w in ctx.warnings))
    return "\n".join(lines)


def expert_report(routed: dict, layers, mesh) -> str:
    """Per mixture-of-experts layer and ep rank: the experts it holds and the rows (routed
    token slots) each of them got in a step, from ``routed`` ({layer: [rows per local expert]
    for each ep rank}); a balanced router gives every expert ``tokens x top-k / experts``."""
    rows = []
    for layer in layers:
        per_rank = routed.get(layer.name)
        local = layer.experts // mesh.ep
        for q in range(mesh.ep):
            got = per_rank[q] if per_rank else None
            first = q * local
            rows.append([layer.name if q == 0 else "", q, f"{first}..{first + local - 1}",
                         "-" if got is None else " ".join(map(str, got)), "-" if got is None else sum(got)])
    return tabulate(rows, headers=["layer", "ep rank", "experts", "rows per expert", "rows"])


def replicated_weights(gm: GraphModule, ctx) -> list[tuple[object, float]]:
    """The weights the planner kept whole although their ops could split them (its fallbacks),
    each once, with their share of the model's parameters, largest first."""
    total = sum(n.meta["val"].numel() for n in gm.graph.nodes if n.op == "get_attr"
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta.get("fxpar_requires_grad")) or 1
    out, seen = [], set()
    for r in ctx.replicated:
        if r.weight in seen or isinstance(ctx.param_placements.get(r.weight), Shard):
            continue
        seen.add(r.weight)
        out.append((r, r.numel / total))
    return sorted(out, key=lambda rs: -rs[1])


def held_beyond_share(gm: GraphModule, ctx, skip=(), min_share: float = 0.01) -> list[tuple]:
    """``(weight, share of the model, fraction a rank holds, why)`` for each weight over
    ``min_share`` of the parameters that a tp rank holds more than ``1/tp`` of, other than those in
    ``skip`` (the fallbacks): tables kept whole by design, rows that several ranks share."""
    params = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta.get("fxpar_requires_grad")]
    total = sum(n.meta["val"].numel() for n in params) or 1
    tp, out, seen = ctx.mesh.tp, [], set(skip)
    for n in params:
        share = n.meta["val"].numel() / total
        place = ctx.param_placements.get(n.target)
        held = place.local_size / place.size if isinstance(place, Shard) else 1.0
        if n.target in seen or share < min_share or held <= 1 / tp + 1e-9 or ctx.is_expert(n.target):
            continue
        seen.add(n.target)
        out.append((n.target, share, held, _why_held(n, place)))
    return sorted(out, key=lambda row: -row[1] * row[2])


def _why_held(node, place) -> str:
    if isinstance(place, Shard):
        return (f"split with rows that {int(place.local_size * place.world / place.size)} ranks share "
                "(fewer heads, or key/value heads, than ranks)")
    user = next(iter(node.users), None)
    while user is not None and user.meta.get(DECISION) is None and len(user.users) == 1 and user.op == "call_function" \
            and not user.meta.get(FALLBACK) and user.target in _CARRIERS:
        user = next(iter(user.users))
    if user is None:
        return "read by nothing"
    where = f"({user.name} in '{module_path(user) or 'the root module'}')"
    decision = user.meta.get(DECISION)
    if decision:
        return f"{decision} {where}"
    return f"read whole by {getattr(user.target, '__name__', user.target)} {where}"


_CARRIERS = {torch.ops.aten.t.default, torch.ops.aten.numpy_T.default, torch.ops.aten.permute.default,
             torch.ops.aten.transpose.int, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def replication_warning(gm: GraphModule, ctx, limit: int = 8) -> str | None:
    """One warning naming every weight replicated by a fallback (None if there is none)."""
    found = replicated_weights(gm, ctx)
    if not found or ctx.mesh.tp == 1:
        return None
    share = sum(s for _, s in found)
    lines = [f"{len(found)} weights ({share:.1%} of the model's parameters) are kept whole on every one of the "
             f"tp={ctx.mesh.tp} ranks instead of split, each rank holding {share * (1 - 1 / ctx.mesh.tp):.1%} of the "
             "model more than its 1/tp share:"]
    for r, s in found[:limit]:
        lines.append(f"  {r.weight} ({s:.1%}), used by node {r.node} in module '{r.module}' at {r.source}: {r.why}")
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more (plan.summary() lists them all)")
    lines.append("Force a split with overrides={'module.name': 'colwise'} where the reason allows it.")
    return "\n".join(lines)


def param_bytes(gm: GraphModule, ctx) -> tuple[int, int]:
    """Bytes of all parameters and of one rank's share (of its stage, its ep rank's experts)."""
    total = local = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not node.meta.get("fxpar_requires_grad"):
            continue
        n = val.numel() * val.element_size()
        # an ep rank holds 1/ep of the experts: the others hold as many different ones
        total += n * (ctx.mesh.ep if ctx.is_expert(node.target) else 1)
        p = ctx.param_placements.get(node.target)
        local += n * p.local_size // p.size if isinstance(p, Shard) else n
    return total, local


def rank_source(module: GraphModule, rank: int, global_gm: GraphModule, mesh=None, stage: int | None = None) -> str:
    """Rank ``rank``'s program ``module`` as a listing (``fxpar/listing.py``): grouped by module,
    fxpar's ops by name with keyword arguments, the user's source line above the lines it became,
    each value's placement, local shape and bytes sent after it."""
    from .listing import rank_listing

    where = f"rank {rank}"
    if mesh is not None:
        coord = mesh.coordinate(rank)
        at = ", ".join(f"{k}={v}" for k, v in coord.items() if getattr(mesh, k) > 1)
        where += f" of {mesh.size} ({at}) on {mesh}"
    if stage is not None:
        where += f", pipeline stage {stage}"
    return rank_listing(module, f"{where}: generated by fxpar", global_gm)


def _kept(m) -> str:
    """Activations per microbatch times how many are in flight, and under a zero-bubble schedule
    what a microbatch keeps between B and W times how many wait for W."""
    out = f"{fmt_bytes(m.activations_per_microbatch)} x{m.in_flight}"
    return out + (f" + W {fmt_bytes(m.deferred)} x{m.deferred_in_flight}" if m.deferred_in_flight else "")


def stage_table(gm: GraphModule, ctx) -> str:
    """Per pipeline stage: where it runs, what it holds, its estimated peak memory per device and
    the bytes it sends per microbatch."""
    from .memory import evaluate

    spec = ctx.pipeline
    by_name = {n.name: n for n in gm.graph.nodes}
    names = ctx.dim_names
    rows = []
    for s in spec.stages:
        m = s.memory.at(spec.sizes, names)
        sent = sum(evaluate(by_name[o].meta["fxpar_memory"].value_bytes, spec.sizes, names) * len(s.sinks[o]) for o in s.outputs)
        mods = f"{s.modules[0]} .. {s.modules[-1]}" if len(s.modules) > 1 else (s.modules[0] if s.modules else "")
        rows.append([s.index, s.rank, len(s.nodes), mods, fmt_bytes(m.params), fmt_bytes(m.grads), fmt_bytes(m.optimizer),
                     _kept(m), fmt_bytes(m.peak), fmt_bytes(sent)]
                    + ([fmt_bytes(m.host)] if m.offloaded else []) + [fmt_bytes(m.cache)])
    sizes = ", ".join(f"{k}={v}" for k, v in spec.sizes.items()) or "the example's"
    offloaded = any(s.memory.offloaded for s in spec.stages)
    cached = any(s.memory.cache for s in spec.stages)  # a key/value cache: its bytes, of the peak
    rows = [r if cached else r[:-1] for r in rows]
    head = (f"stages ({spec.schedule}, {spec.microbatches} microbatches, sizes {sizes}, optimizer {ctx.options.optimizer}); "
            f"memory per device of the stage's rank" + ("; grads, optimizer and fp32 masters in host memory (offload)"
                                                       if offloaded else ""))
    return head + "\n" + tabulate(
        rows, headers=["stage", "pp rank", "nodes", "modules", "params", "grads", "optimizer", "activations x in flight",
                       "peak (device)" if offloaded else "peak", "sends/microbatch"] + (["host"] if offloaded else [])
        + (["kv cache"] if cached else []), disable_numparse=True)


def state_table(ctx) -> str:
    """Per pipeline rank, the bytes it holds per parameter of its stages (counted as one tp rank
    holds them), by category: the numbers ZeRO's and Megatron's formulas give (16 for fp32
    AdamW without sharding, 4 + 4 + 8/dp at zero 1, ...)."""
    from .plan_memory import device_memory

    zero, dp = ctx.options.zero, ctx.mesh.dp
    rows = []
    for rank, m in enumerate(device_memory(ctx, {})):
        if not m.weights:
            continue
        per = lambda b: f"{float(b) / float(m.weights):.2f}"  # noqa: E731
        rows.append([rank, f"{int(m.weights):,}", per(m.params), per(m.masters), per(m.grads), per(m.optimizer),
                     per(m.params + m.masters + m.grads + m.optimizer), per(m.static - m.buffers), per(m.host),
                     fmt_bytes(m.gathered)])
    split = f"zero {zero} over dp={dp}" if zero else "zero 0 (every dp rank holds all of it)"
    where = "; masters, grads and optimizer state in host memory" if ctx.options.offload else ""
    head = (f"bytes per parameter on each device ({split}; layers in {ctx.options.precision}; "
            f"optimizer {ctx.options.optimizer}{where})")
    return head + "\n" + tabulate(rows, headers=["pp rank", "parameters", "weights", "fp32 masters", "grads",
                                                 "optimizer", "total", "on the device", "on the host", "gathered at once"],
                                disable_numparse=True)


def recompute_report(gm: GraphModule, ctx) -> str:
    """What backward recomputes: the regions, their forward FLOPs per microbatch against the
    whole forward's, and the most a remake holds at once beyond the kept activations."""
    from .memory import evaluate, node_memory

    spec = ctx.pipeline
    f = lambda e: evaluate(e, spec.sizes, ctx.dim_names)  # noqa: E731
    total = f(sum(node_memory(n).flops for n in gm.graph.nodes))
    again = f(sum(s.memory.recompute_flops for s in spec.stages))
    most = max((f(s.memory.recomputed) for s in spec.stages), default=0)
    names = ctx.recomputed
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    limit = f", memory_limit {fmt_bytes(ctx.options.memory_limit)}" if ctx.options.recompute == "auto" else ""
    share = f" ({again / total:.0%})" if total else ""
    return (f"recompute {ctx.options.recompute!r}{limit}: backward remakes {shown or 'nothing'}; "
            f"{again / 1e9:.3g} of {total / 1e9:.3g} GFLOP of the forward per microbatch recomputed{share}, "
            f"{fmt_bytes(most)} more held while a region is remade")


def schedule_report(ctx) -> str:
    """The schedule as a step x rank grid, and its bubble against the formula."""
    from . import schedule as sched

    spec = ctx.pipeline
    s = sched.make(spec.schedule, ctx.mesh.pp, spec.microbatches, spec.virtual)
    if s.splits_backward:
        return (f"schedule {spec.schedule}: bubble {s.bubble():.3f} of the time (F = B = W: backward = 2 x forward, "
                f"half of it weight gradients), formula {s.formula()} = {s.ideal_bubble():.3f}\n" + s.grid())
    return (
        f"schedule {spec.schedule}: bubble {s.bubble():.3f} of the time (backward = 2 x forward), "
        f"formula {s.formula()} = {s.ideal_bubble():.3f}\n" + s.grid()
    )
