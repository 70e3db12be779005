"""``Plan.check``: a tensor-parallel plan against the single-device model, node by node.

The single-device graph and every rank run on the same inputs; each node's value on the ranks is
put back together by its placement and compared with the reference's, in graph order, then (with
a loss) each gradient, in the order backward reaches them. The first that differs is named.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .codegen import build_module, rank_graph
from .errors import DivergenceError, FxparError, describe_node
from .holder import populate
from .metadata import GRAD_PARTIAL, ORIGIN, PLACEMENT
from .ops import collectives as C
from .placement import PARTIAL, REPLICATE, Shard
from .runtime.batches import flat_inputs
from .simulate import Recorder, assemble, run_ranks


def check(plan, args, kwargs, rtol: float, atol: float, loss_fn=None) -> int:
    """What ``Plan.check`` does for ``plan`` (see there): the number of values compared. A part of
    ``Plan``, kept apart: it runs the ranks in ``plan``'s own contexts."""
    mesh = plan.mesh
    if mesh.pp > 1 or mesh.dp > 1:
        raise FxparError("check compares tensor-parallel plans node by node; for pipelines compare simulate_train's "
                         "loss and gradients")
    if mesh.ep > 1:
        raise FxparError(
            "check compares tensor-parallel plans node by node, but with ep > 1 each rank runs its part of the batch "
            "and its own experts: compare simulate / simulate_train with the model instead"
        )
    if mesh.cp > 1:
        raise FxparError(
            "check compares tensor-parallel plans node by node, but with cp > 1 the graph is one cp rank's program "
            "(a slice of the sequence): compare simulate / simulate_train with the model instead"
        )
    flat = flat_inputs(plan.captured, args, kwargs)
    grads = loss_fn is not None
    rng_state = torch.default_generator.get_state()
    ref = Recorder(reference_module(plan), grads)
    out = ref.run_model(*flat)
    if grads:
        loss_fn(out).backward()
    torch.default_generator.set_state(rng_state)  # the ranks draw what the reference drew
    mods = [plan.rank_module(r) for r in range(plan.tp)]

    def record(r):
        rec = Recorder(mods[r], grads)
        result = rec.run_model(*flat)
        if not grads:
            return rec.values, {}
        loss_fn(result).backward()
        found = {k: g.clone() for k, g in rec.gradients().items()}
        mods[r].zero_grad()  # checking leaves no gradients behind for training
        return rec.values, found

    ranks = run_ranks(record, plan._contexts())
    nodes = [n for n in plan.graph_module.graph.nodes if n.meta.get(ORIGIN) is not None and n.op != "output"]
    compared = _compare(nodes, ref.values, [v for v, _ in ranks], rtol, atol, "value")
    if grads:
        compared += _compare(reversed(nodes), ref.gradients(), [g for _, g in ranks], rtol, atol, "gradient")
    return compared


def _compare(nodes, expected, per_rank, rtol, atol, what: str) -> int:
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
        if grad and node.meta.get(GRAD_PARTIAL):
            place = PARTIAL  # each rank's part of the gradient, until the all-reduce above it
            grad = False  # summed as a value is
        elif grad and any(u.target is C.sum_duplicates for u in node.users):
            grad = False  # rows several ranks hold: each holds their summed gradient already
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


def reference_module(plan) -> GraphModule:
    """The single-device model as ``plan``'s captured graph, with the model's (or the seeded) tensors whole."""
    holder = nn.Module()
    populate(holder, plan.captured, {}, 0, plan.model, "cpu", seed=plan.seed, init_fn=plan.init_fn)
    graph = rank_graph(plan.captured.gm, 0, torch.device("cpu"))
    return build_module(holder, graph, plan.captured.gm, "Reference", plan._submods)
