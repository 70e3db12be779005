"""Which ops' weight gradients can wait for a zero-bubble schedule's W, read from the graph's data
flow (never from names), and the rewrite that makes a rank's program call them through
``fxpar.ops.deferred.later``. Shared by the pass that marks them (``passes/split_backward.py``)
and codegen, which applies the marks to each rank's stage programs.

An op qualifies when it is a contraction (matmul, linear, convolution, einsum of two operands)
of an activation by a weight, the weight a trainable parameter or a view of one, and the op
linear in it: its weight gradient then reads only the activation and the output's gradient.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.utils import _pytree as pytree

from .metadata import DEFERRED, LOCAL, RECOMPUTE, REQUIRES_GRAD, STAGE
from .ops.deferred import later
from .ops.params import gather_params

aten = torch.ops.aten
# op -> (flat positions of its two contracted operands, of an added bias)
CONTRACTIONS = {
    aten.linear.default: ((0, 1), (2,)),
    aten.mm.default: ((0, 1), ()),
    aten.matmul.default: ((0, 1), ()),
    aten.bmm.default: ((0, 1), ()),
    aten.addmm.default: ((1, 2), (0,)),
    aten.baddbmm.default: ((1, 2), (0,)),
    aten.conv1d.default: ((0, 1), (2,)),
    aten.conv2d.default: ((0, 1), (2,)),
    aten.conv3d.default: ((0, 1), (2,)),
    aten.convolution.default: ((0, 1), (2,)),
    aten.einsum.default: ((1, 2), ()),  # (equation, [a, b]) flattens to equation, a, b
}


def deferrable(node: Node, through_gathers: bool = False) -> tuple[int, ...] | None:
    """The flat positions of ``node``'s weight operands (the contracted weight, and a bias) when
    its weight gradient can wait for W; ``None`` otherwise."""
    if node.op != "call_function" or node.target not in CONTRACTIONS or RECOMPUTE in node.meta:
        return None
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    operands, biases = CONTRACTIONS[node.target]
    flat = pytree.tree_flatten((node.args, node.kwargs))[0]
    if len(flat) <= max(operands) or (node.target is aten.einsum.default and len(flat) != 3):
        return None
    a, b = (flat[i] for i in operands)
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    stage = node.meta.get(STAGE)
    held_a, held_b = _parameter_view(a, through_gathers, stage), _parameter_view(b, through_gathers, stage)
    if held_a == held_b:  # two activations, or two weights: a product the weights do not enter linearly
        return None
    weight = operands[1] if held_b else operands[0]
    extra = tuple(i for i in biases
                  if i < len(flat) and isinstance(flat[i], Node) and _parameter_view(flat[i], through_gathers, stage))
    for call in (node.meta.get(LOCAL) or {}).values():  # what each rank reads instead (rows shared over tp)
        if call is None:
            continue
        local = pytree.tree_flatten((call.args, call.kwargs))[0]
        if not all(i < len(local) and isinstance(local[i], Node) and _parameter_view(local[i], through_gathers, stage)
                   for i in (weight, *extra)):
            return None
    return (weight, *extra)


def _parameter_view(node: Node, through_gathers: bool, stage: int | None = None) -> bool:
    """Whether ``node`` is a trainable parameter or a view of one (no new memory, no other
    input), or with ``through_gathers`` one's kept whole copy out of ``gather_params``. The
    views include fxpar's aliasing collectives (a weight's gradient summed over cp or over the
    tp ranks sharing its rows): W runs their backward, as B would have. Within ``stage``: a
    weight's view made in another stage reaches this one as a value sent, not as a weight."""
    while node.op == "call_function" and getattr(node.target, "is_view", False):
        if stage is not None and node.meta.get(STAGE, stage) != stage:
            return False
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    if (through_gathers and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], Node) and node.args[0].target is gather_params):
        node = node.args[0].args[0][node.args[1]]
    return node.op == "get_attr" and bool(node.meta.get(REQUIRES_GRAD))


def defer_weight_grads(graph: Graph) -> Graph:
    """``graph`` (a rank's program) with each op marked ``fxpar_deferred`` called through
    ``later``, where the rank's op still reads its weights as marked (a per-rank call may put a
    collective in between)."""
    for node in graph.nodes:
        weights = node.meta.get(DEFERRED)
        if weights is None or node.op != "call_function" or node.target not in CONTRACTIONS:
            continue
        if deferrable(node, True) != weights:  # the rank's op is not the one marked
            continue
        node.args = (node.target, weights, *node.args)
        node.target = later
    graph.lint()
    return graph
