"""Fake-tensor values of a rewritten graph: the ``val`` of every node, recomputed.

Rewrites that change sizes (one cp rank's slice of the sequence, the rows an ep rank's experts
receive) run the new graph once on the capture's fake tensors, as rank 0 with collectives of the
right shapes (``ShapeComm``), instead of working out every size by hand.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.node import Node, map_aggregate

from .codegen import get_path
from .ops.comm import shape_comms
from .ops.context import RankContext, running


def fake_mode(gm: GraphModule):
    """The ``FakeTensorMode`` the graph's values were made in."""
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    raise ValueError("the graph carries no fake tensors to estimate with")


def propagate(gm: GraphModule, template: GraphModule, mesh) -> None:
    """Every node's ``val`` in ``gm``, run on ``template``'s fake tensors (attributes of ``gm``,
    placeholders' values as they are)."""
    env: dict = {}
    with fake_mode(template), running(RankContext(rank=0, comms=shape_comms(mesh))):
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "get_attr":
                obj = get_path(gm, node.target)
                out = (
                    torch.empty(obj.shape, dtype=obj.dtype, device=obj.device) if isinstance(obj, torch.Tensor) else obj
                )
            elif node.op == "placeholder":
                out = node.meta.get("val")
            else:
                args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
                out = node.target(*args, **kwargs)
                node.meta["val"] = out
            env[node] = out
