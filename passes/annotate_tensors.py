"""Pass (analysis): which values can carry a gradient.

Reads ``val`` (written by torch.export: the global FakeTensor of every node) and the module's
parameters. Writes ``fxpar_requires_grad`` on every node: True for trainable parameters and
floating-point user inputs, and for floating outputs of ops that consume such a value outside a
``no_grad`` region. ``insert_collectives`` uses it to add backward-only all-reduces only where a
gradient can flow.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxpar.codegen import get_path
from fxpar.metadata import REQUIRES_GRAD
from fxpar.plan_context import PlanContext


def annotate_tensors(gm: GraphModule, ctx: PlanContext) -> GraphModule:
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        floating = isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
        if node.op == "placeholder":
            rg = floating
        elif node.op == "get_attr":
            obj = get_path(gm, node.target)
            rg = isinstance(obj, torch.nn.Parameter) and obj.requires_grad
        elif node.op == "output":
            rg = False
        else:
            grad_off = node.target is torch.ops.higher_order.wrap_with_set_grad_enabled and node.args[0] is False
            any_in = any(n.meta.get(REQUIRES_GRAD, False) for n in node.all_input_nodes)
            if isinstance(v, (tuple, list)):
                floating = any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in v)
            rg = any_in and floating and not grad_off
        node.meta[REQUIRES_GRAD] = bool(rg)
    return gm
