"""``torch.autocast`` around a parallel model: the casts eager autocast makes, as nodes of the graph.

Autocast casts an op's inputs as the op is dispatched (to bf16 before a matmul, to fp32 before a
reduction it keeps in full precision, to the widest dtype before a ``cat``). Export records the
ops but not the casts: its graph run outside autocast computes in fp32, and a rank's program runs
in threads and stages autocast never sees. So a call under autocast is captured under it and the
casts are written into the graph:

* each op is run once more on fake tensors of the call's device, under the same autocast, while a
  dispatch mode records the casts autocast makes of the op's inputs;
* every such cast becomes ``aten.to.dtype(x, dtype)`` before the op (in the op's module, at its
  source line), and the values after it get their new dtypes.

The result computes op by op in the dtypes eager autocast computes in, on every rank and stage,
with or without an autocast context around the run; the dump shows the casts and the memory model
counts the 16-bit copies (a matmul keeps its cast inputs for backward, as eagerly). The policy is
torch's own (which ops cast to what on which device), never a list of ours.
"""

from __future__ import annotations

import contextlib
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def autocast_of(args, kwargs=None) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` of the autocast a call with these inputs runs under (the device
    of its tensors: ``"cuda"`` if any is on a GPU), or None outside autocast."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    kinds = {t.device.type for t in leaves}
    device_type = next((k for k in kinds if k not in ("cpu", "meta")), "cpu")
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def outside_autocast(state: tuple[str, torch.dtype] | None):
    """The context a program captured under ``state`` (``autocast_of``) runs in: autocast off,
    since its casts are nodes of the graph, and fxpar's own ops (collectives, the split loss) keep
    the dtypes the plan gave them."""
    return torch.autocast(state[0], enabled=False) if state else contextlib.nullcontext()


_TO_DTYPE = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
             torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}


class DistinctCasts(TorchFunctionMode):
    """While export captures for autocast: a cast to the dtype a tensor has already
    (``x.float()`` of the fp32 capture) is recorded as a copy of its own. Otherwise the cast
    returns ``x`` itself and export reads every later use of ``x`` from the cast, although under
    autocast ``x`` is bf16 and the cast makes fp32 (``xq.float()`` ... ``out.type_as(xq)``).
    ``apply_autocast`` drops the copies that stay copies to the same dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dtype = _TO_DTYPE.get(func)
            if func in (torch.Tensor.to, torch.Tensor.type):
                rest = [a for a in (*args[1:], kwargs.get("dtype")) if isinstance(a, torch.dtype)]
                moved = any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:]) or "device" in kwargs
                dtype = rest[0] if len(rest) == 1 and not moved else None
            if dtype is not None and dtype == x.dtype:
                return aten._to_copy.default(x, dtype=dtype)
        return func(*args, **kwargs)


class _Casts(TorchDispatchMode):
    """Records the casts made of ``inputs`` (tensors by identity) while an op runs."""

    def __init__(self, inputs: list):
        super().__init__()
        self.inputs = {id(t): t for t in inputs}
        self.casts: dict[int, torch.dtype] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and id(args[0]) in self.inputs and "dtype" in kwargs:
            self.casts[id(args[0])] = kwargs["dtype"]
        return func(*args, **kwargs)


def apply_autocast(gm: GraphModule, device_type: str, dtype: torch.dtype) -> None:
    """Write the casts ``torch.autocast(device_type, dtype)`` makes into ``gm`` (captured on the
    meta device, its values fake), and give every value its dtype under them."""
    from .fake_values import fake_mode

    fake = fake_mode(gm)
    on_device = torch.device(device_type)
    graph = gm.graph
    with fake:
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                if node.op == "call_function":  # getitem and the like: their input's dtypes
                    _retype_from_inputs(node)
                continue
            if node.target is aten._assert_tensor_metadata.default:  # export's check of the fp32 capture
                node.kwargs = {**node.kwargs, "dtype": node.args[0].meta["val"].dtype}
                continue
            twins: dict[Node, torch.Tensor] = {}

            def twin(a):
                if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor):
                    if a not in twins:
                        v = a.meta["val"]
                        twins[a] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=on_device)
                    return twins[a]
                if isinstance(a, Node):
                    return a.meta.get("val")
                return on_device if isinstance(a, torch.device) and a.type == "meta" else a

            args, kwargs = map_aggregate(node.args, twin), map_aggregate(node.kwargs, twin)
            plain, recorder = _Casts(list(twins.values())), _Casts(list(twins.values()))
            # the op's own casts, which it makes under autocast too (none where only autocast makes it run)
            with torch.autocast(device_type, enabled=False), plain, contextlib.suppress(RuntimeError):
                node.target(*args, **kwargs)
            with torch.autocast(device_type, dtype=dtype), recorder:
                out = node.target(*args, **kwargs)
            for source, t in twins.items():
                to = recorder.casts.get(id(t))
                if to is not None and to != t.dtype and plain.casts.get(id(t)) != to:
                    with graph.inserting_before(node):
                        cast = graph.call_function(aten.to.dtype, (source, to))
                    cast.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
                    cast.meta["val"] = _retyped(source.meta["val"], to)
                    node.replace_input_with(source, cast)
            node.meta["val"] = _retype_like(node.meta.get("val"), out)
    for node in list(graph.nodes):  # DistinctCasts' copies still to their own dtype
        if node.target is aten._to_copy.default and set(node.kwargs) == {"dtype"} \
                and node.args[0].meta["val"].dtype == node.kwargs["dtype"]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _retyped(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if v.dtype == dtype:
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=v.device)


def _retype_like(val, out):
    """``val`` (the captured value, on meta) with the dtypes of ``out`` (the same structure)."""
    if isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor):
        return _retyped(val, out.dtype)
    if isinstance(val, (list, tuple)) and isinstance(out, (list, tuple)) and len(val) == len(out):
        return type(val)(_retype_like(v, o) for v, o in zip(val, out))
    return val


def _retype_from_inputs(node: Node) -> None:
    import operator

    if node.target is operator.getitem and isinstance(node.args[0], Node):
        src = node.args[0].meta.get("val")
        if isinstance(src, (list, tuple)):
            node.meta["val"] = _retype_like(node.meta.get("val"), src[node.args[1]])
