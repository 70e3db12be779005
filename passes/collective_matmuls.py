"""Pass (rewrite): sequence parallelism's gathers and reduce-scatters fused with the linears beside
them, so that each transfer overlaps the matmul work that does not wait for it.

Runs after ``recompute_gathers`` when ``ctx.options.overlap`` is set, tp > 1 and the schedule
does not split backward (a zero-bubble schedule's W takes the weight gradients of plain
``linear`` nodes, ``passes/split_backward.py``). Reads the ``gather_to_tp`` and ``reduce_scatter``
nodes over tp that ``insert_collectives`` made.

* A ``gather_to_tp`` whose every user is a ``linear`` of it by a weight becomes one
  ``gathered_linears`` node keeping the gathered input for backward (as the unfused ops did; the
  memory model sees the same tensors) and a ``getitem`` per linear: forward computes each
  chunk of tokens as it goes around the tp ranks; backward sums the input gradient's chunks
  around them as they are computed.
* A ``reduce_scatter`` whose input is a ``linear`` by a weight that nothing else reads (the
  row-parallel projection closing an attention or MLP block), with no bias or a bias added once
  through ``to_partial``, becomes one ``linear_reduce_scatter`` node: each rank's rows' partial
  sums are computed and added as they go around the tp ranks; backward passes the output
  gradient's chunks around as the input gradient's rows are computed.

Both ops are in ``fxpar/ops/collective_matmul.py``; they keep the unfused ops' bytes on the wire
(``fxpar_comm`` unchanged). Only collectives along a token dim are fused (not along the features
a linear contracts or makes), over tp, before stages and recomputed regions are planned (which
then see the fused nodes); a layout in which ranks share tokens runs the unfused computation
inside the op. What is fused shows in the per-rank code as a ``gathered_linears`` or
``linear_reduce_scatter`` line in place of a collective and its matmuls.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxpar.metadata import COMM, INPUTS, copy_meta, replace_uses
from fxpar.ops import collective_matmul as CM
from fxpar.ops import collectives as C
from fxpar.passes.recompute_gathers import fuse_gather, linear_users
from fxpar.plan_context import PlanContext
from fxpar.rules import is_weight

aten = torch.ops.aten


def _over_tp(node: Node) -> bool:
    return node.kwargs.get("group", "tp") == "tp"


def _token_dim(node: Node, dim: int) -> bool:
    """Whether ``dim`` of ``node``'s value is a leading (token) dim, not the features a linear
    contracts or makes: a collective matmul's chunks are chunks of tokens."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and 0 <= dim < val.dim() - 1


def _fuse_scatter(graph, scatter: Node, lin: Node) -> None:
    x, weight = lin.args[0], lin.args[1]
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    partial_bias = bias
    if bias is not None:
        bias = bias.args[0]
    _, dim, size = scatter.args[:3]
    runs = scatter.args[3] if len(scatter.args) > 3 else scatter.kwargs.get("runs")
    with graph.inserting_before(scatter):
        fused = graph.call_function(CM.linear_reduce_scatter, (x, weight, bias, dim, size, runs),
                                    {"group": scatter.kwargs.get("group", "tp")})
    copy_meta(lin, fused)
    fused.meta.update({k: v for k, v in scatter.meta.items() if k not in ("stack_trace", "nn_module_stack")})
    lin_inputs = dict(lin.meta.get(INPUTS) or {})
    if partial_bias is not None:
        lin_inputs.pop(partial_bias.name, None)
        lin_inputs[bias.name] = (partial_bias.meta.get(INPUTS) or {}).get(bias.name)
    lin_inputs.pop(lin.name, None)
    fused.meta[INPUTS] = lin_inputs
    replace_uses(scatter, fused)
    graph.erase_node(scatter)
    graph.erase_node(lin)
    if partial_bias is not None and not partial_bias.users:
        graph.erase_node(partial_bias)


def _scatter_linear(scatter: Node) -> Node | None:
    """The ``linear`` a reduce-scatter can be fused with, if any."""
    lin = scatter.args[0]
    if not isinstance(lin, Node) or lin.target is not aten.linear.default or len(lin.users) != 1:
        return None
    if not is_weight(lin.args[1]):
        return None
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    if bias is not None and not (isinstance(bias, Node) and bias.target is C.to_partial and _over_tp(bias)
                                 and len(bias.users) == 1):
        return None
    return lin if _token_dim(scatter, scatter.args[1]) else None


def collective_matmuls(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not _over_tp(node) or COMM not in node.meta:
            continue
        if node.target is C.gather_to_tp:
            linears = linear_users(node)
            if linears is not None and _token_dim(node, node.args[1]):
                fuse_gather(graph, node, linears, keep_gathered=True)
        elif node.target is C.reduce_scatter:
            lin = _scatter_linear(node)
            if lin is not None:
                _fuse_scatter(graph, node, lin)
    graph.lint()
    gm.recompile()
    return gm
