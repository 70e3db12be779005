"""What a sharding rule receives and returns.

A rule looks at one node and the placements of its tensor inputs and answers with a
``Sharding``: the placement of the output and the placement in which it *consumes* each input.
Where that differs from what the input's producer gives, the planner records a mismatch and
``insert_collectives`` later adds the conversion (slice, all-gather, all-reduce, ...). Rules never
edit the graph.

An input whose placement is ``FREE`` is a weight (a ``get_attr`` parameter, possibly transposed or
cast) that has not been used yet: the rule chooses its placement, and the weight is then stored
that way on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch.fx import Node

from ..placement import REPLICATE, Placement, Shard


class _Free:
    """Placement of a weight that its first consumer gets to choose."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FREE"


FREE = _Free()


@dataclass
class Sharding:
    """A rule's answer for one node.

    ``inputs`` maps input nodes to the placement the op consumes them in (inputs left out are
    consumed as they are, ``FREE`` ones as ``Replicate``). ``fallback`` names why an op ran
    replicated because no rule could keep its inputs sharded.
    """

    output: Placement | tuple | None
    inputs: dict[Node, Placement] = field(default_factory=dict)
    fallback: str | None = None


class RuleContext(Protocol):
    world: int

    def placement(self, node: Node):  # Placement | FREE | None
        ...

    def decision(self, node: Node) -> str:
        ...

    def seed_layout(self, node: Node) -> Shard | None:
        ...

    def user_input_dependent(self, node: Node) -> bool:
        ...

    def is_weight(self, node: Node) -> bool:
        ...


Rule = Callable[[Node, RuleContext], Sharding]


def val(node) -> object:
    return node.meta.get("val") if isinstance(node, Node) else None


def is_tensor_node(node) -> bool:
    return isinstance(node, Node) and isinstance(node.meta.get("val"), torch.Tensor)


def shape(node: Node) -> tuple:
    return tuple(node.meta["val"].shape)


def ndim(node: Node) -> int:
    return node.meta["val"].dim()


def static(size) -> int | None:
    """The size as an int when it is not symbolic."""
    from ..layout_algebra import size_token

    token = size_token(size)
    return token if isinstance(token, int) else None


def static_numel(node: Node) -> int | None:
    """The number of elements of a tensor node whose sizes are all static."""
    n = 1
    for size in shape(node):
        size = static(size)
        if size is None:
            return None
        n *= size
    return n


def tensor_args(node: Node) -> list[Node]:
    """Tensor-valued input nodes in argument order (lists flattened), without repeats."""
    return [a for a in node.all_input_nodes if is_tensor_node(a)]


def op_name(node: Node) -> str:
    """``layer_norm.default`` for ``aten.layer_norm.default``; the function name otherwise."""
    return getattr(node.target, "__name__", str(node.target))


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def replicated(node: Node, ctx: RuleContext, output=REPLICATE, reason: str | None = None) -> Sharding:
    """Consume every tensor input replicated; report ``reason`` if that gathers a sharded one."""
    inputs = {n: REPLICATE for n in tensor_args(node)}
    gathers = any(isinstance(ctx.placement(n), Shard) for n in inputs)
    return Sharding(output=output, inputs=inputs, fallback=reason if gathers else None)


def arg(node: Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of an ATen call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
