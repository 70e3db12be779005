"""Tensors a model builds in ``forward`` from Python data, and what capture makes of them.

Capture runs the model on the meta device. A tensor that ``forward`` builds from a Python number
on its input's device (``torch.tensor(mask_value, device=x.device)``, as GPT-Neo does; the list
index of ``x[..., [-2], :]``, as Falcon does) would then be a meta tensor: export lifts it out of
the graph as a constant with no values, and no rank could ever run the program. Such data never
depends on the inputs, so capture builds it on the CPU instead (``RealConstants``): the constant
keeps its values, every rank moves it to its own device, and a 0-dim or index tensor on the CPU
mixes with tensors of any device as it would on the model's own.

``fxpar.canonical`` then turns an index by such a constant run of positions (``x[..., [-2], :]``)
into the slice it is.
"""

from __future__ import annotations

import numbers

import torch
from torch.fx import GraphModule, Node
from torch.overrides import TorchFunctionMode

from .errors import CaptureError, describe_node

aten = torch.ops.aten
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.scalar_tensor)
_CARRY = (aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default, aten.clone.default)


def _on_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _index_list(i):
    if isinstance(i, list) and i and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in i):
        return torch.tensor(i)
    return i


def _scalar(args) -> bool:
    return bool(args) and isinstance(args[0], numbers.Number)


class RealConstants(TorchFunctionMode):
    """While active, scalars built from Python numbers for the meta device are built on the CPU
    (a 0-dim CPU tensor mixes with tensors of any device; a longer one would not), and list
    indices of meta tensors become CPU index tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA and _on_meta(kwargs.get("device")) and (func is torch.scalar_tensor or _scalar(args)):
            kwargs = dict(kwargs, device="cpu")
        elif (func is torch.Tensor.new_tensor and len(args) > 1 and args[0].device.type == "meta"
              and "device" not in kwargs and _scalar(args[1:])):
            kwargs = dict(kwargs, device="cpu")
        elif func is torch.Tensor.__getitem__ and len(args) == 2 and args[0].device.type == "meta":
            index = args[1]
            index = tuple(_index_list(i) for i in index) if isinstance(index, tuple) else _index_list(index)
            args = (args[0], index)
        return func(*args, **kwargs)


def constant_value(gm: GraphModule, node) -> torch.Tensor | None:
    """The values of ``node`` when it is a lifted constant (through its copy and detach)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in _CARRY:
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, torch.Tensor) or obj.device.type == "meta" or isinstance(obj, torch.nn.Parameter):
        return None
    return obj


def check_constants(gm: GraphModule, lifted) -> None:
    """Refuse a graph that reads a constant with no values (built on the meta device by a path
    ``RealConstants`` does not see), naming where the model builds it."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in lifted:
            continue
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor) and obj.device.type == "meta" and obj.numel():
            users = list(node.users)
            where = describe_node(users[0]) if users else describe_node(node)
            raise CaptureError(
                f"forward builds a tensor from data on the meta device that fxpar captured it on, so it has no "
                f"values ({node.target}, shape {tuple(obj.shape)}):\n  {where}\n"
                "What to do: build it on the CPU (torch.tensor(..., device='cpu')) or as a buffer of the module, "
                "registered in __init__"
            )
