"""``torch.autocast`` around a parallel model: the casts eager autocast makes, as nodes of the graph.

Autocast casts an op's inputs as the op is dispatched (to bf16 before a matmul, to fp32 before a
reduction it keeps in full precision, to the widest dtype before a ``cat``). Export records the
ops but not the casts: its graph run outside autocast computes in fp32, and a rank's program runs
in threads and stages autocast never sees. So a call under autocast is captured under it and the
casts are written into the graph:

* the call is exported on fake tensors of its device (``on_fake_device``: nothing is allocated)
  under the same autocast, so the model's Python code reads the dtypes eager autocast gives it (a
  norm's ``input_dtype = x.dtype``, a mask's ``torch.finfo(q.dtype).min``), then moved onto the
  meta device the planner works on (``onto_meta``);
* each op is run once more on fake tensors of the call's device, under the same autocast, while a
  dispatch mode records the casts autocast makes of the op's inputs;
* every such cast becomes ``aten.to.dtype(x, dtype)`` before the op (in the op's module, at its
  source line).

The result computes op by op in the dtypes eager autocast computes in, on every rank and stage,
with or without an autocast context around the run; the dump shows the casts and the memory model
counts the 16-bit copies (a matmul keeps its cast inputs for backward, as eagerly). The policy is
torch's own (which ops cast to what on which device), never a list of ours.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree
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


def on_fake_device(model: torch.nn.Module, device_type: str, fake) -> torch.nn.Module:
    """A copy of ``model`` (a meta skeleton) whose parameters and buffers are fake tensors of
    ``device_type`` in the fake mode ``fake``: autocast casts what runs on its device, and a
    model's Python code then reads the dtypes eager autocast gives it (``input_dtype = x.dtype``
    in a norm, ``torch.finfo(q.dtype).min`` for a mask). Nothing is allocated."""
    memo: dict[int, object] = {}
    with fake:
        for p in model.parameters():
            if id(p) not in memo:
                t = torch.empty(p.shape, dtype=p.dtype, device=device_type)
                memo[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device=device_type)
    out = copy.deepcopy(model, memo)
    out.train(model.training)
    return out


def onto_meta(gm: GraphModule, device_type: str, fake) -> None:
    """The graph exported on fake ``device_type`` tensors, as if captured on the meta device (what
    the planner works on): parameters and buffers as meta tensors, values as fake meta tensors with
    the same (symbolic) sizes, ``device_type`` arguments as ``meta``. Constants built in forward
    keep their values."""
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
            meta = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path))
            if isinstance(t, torch.nn.Parameter):
                owner._parameters[leaf] = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
            else:
                owner._buffers[leaf] = meta

    def to_meta(v):
        if isinstance(v, torch.Tensor) and v.device.type == device_type:
            with fake:
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        return v

    device = torch.device(device_type)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["val"] = map_aggregate(node.meta["val"], to_meta)
        swap = lambda a: torch.device("meta") if isinstance(a, torch.device) and a.type == device.type else a  # noqa: E731
        node.args, node.kwargs = map_aggregate(node.args, swap), map_aggregate(node.kwargs, swap)
    gm.recompile()


class _Casts(TorchDispatchMode):
    """Records the casts made of ``inputs`` (tensors by identity) before an op computes anything:
    autocast casts the inputs and then lets the op run; what the op casts inside (an attention
    kernel computing bf16 inputs in fp32) comes after its first other op and is its own."""

    def __init__(self, inputs: list):
        super().__init__()
        self.inputs = {id(t): t for t in inputs}
        self.casts: dict[int, torch.dtype] = {}
        self.computing = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default:
            if not self.computing and id(args[0]) in self.inputs and "dtype" in kwargs:
                self.casts[id(args[0])] = kwargs["dtype"]
        elif func.namespace != "prim" and not func._opname.startswith("sym_"):  # not a query of sizes or device
            self.computing = True
        return func(*args, **kwargs)


def apply_autocast(gm: GraphModule, device_type: str, dtype: torch.dtype) -> None:
    """Write the casts ``torch.autocast(device_type, dtype)`` makes into ``gm`` (captured under it
    and moved onto the meta device: its values have autocast's dtypes already; the casts that
    made them are what the graph lacks)."""
    from .fake_values import fake_mode

    fake = fake_mode(gm)
    on_device = torch.device(device_type)
    graph = gm.graph
    with fake:
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if node.target is aten._assert_tensor_metadata.default:  # a check of dtypes: it casts nothing
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
            with torch.autocast(device_type, enabled=False), plain, _quiet(), contextlib.suppress(RuntimeError):
                node.target(*args, **kwargs)
            with torch.autocast(device_type, dtype=dtype), recorder:
                node.target(*args, **kwargs)
            for source, t in twins.items():
                to = recorder.casts.get(id(t))
                if to is not None and to != t.dtype and plain.casts.get(id(t)) != to:
                    with graph.inserting_before(node):
                        cast = graph.call_function(aten.to.dtype, (source, to))
                    cast.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
                    cast.meta["val"] = _retyped(source.meta["val"], to)
                    node.replace_input_with(source, cast)
    graph.lint()
    gm.recompile()


@contextlib.contextmanager
def _quiet():
    """Fake tensors log the error of an op that fails (mixed dtypes only autocast makes valid):
    expected here, so not shown."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _retyped(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if v.dtype == dtype:
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=v.device)
