"""Turn an unmodified ``nn.Module`` and example inputs into a torch.fx ``GraphModule``.

Why ``torch.export`` (non-strict) and not ``torch.fx.symbolic_trace``: symbolic tracing runs the
model on proxies and fails on the code real models are made of — every Hugging Face model we
tried stops with ``co_varnames is too small`` and transformers has dropped its own fx tracer.
Non-strict export runs the Python code for real on fake tensors, so ordinary Python control flow,
``ModelOutput`` dataclasses and caches work, and it records ATen-level ops with the metadata we
report with (``val`` shapes, ``nn_module_stack``, ``stack_trace``). The graph is the *unlifted*
module (``ExportedProgram.module()``): parameters stay ``get_attr`` nodes named by their original
fully-qualified names, so per-rank modules keep the user's parameter names.

Capture always runs on a meta-device copy of the model, so it allocates no weight memory, gives
the same graph on every rank, and works for models built on the meta device. Batch and sequence
sizes can be symbolic: pass ``dynamic_shapes`` in ``torch.export`` form, or a name string per
dimension (``{"idx": {0: "batch", 1: "seq"}}``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sysconfig
import traceback
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .autocast import apply_autocast, on_fake_device, onto_meta
from .canonical import filled_buffers_as_cat, index_runs_as_slices
from .constants import RealConstants, check_constants
from .errors import _TORCH_DIR, CaptureError

_FXPAR_DIR = __file__.rsplit("/", 1)[0]
_PATHS = sysconfig.get_paths()


def _not_the_users(file: str) -> bool:
    """Frames of torch, fxpar and Python's own library (not of packages installed beside it)."""
    if file.startswith((_TORCH_DIR, _FXPAR_DIR)):
        return True
    return file.startswith(_PATHS["stdlib"]) and not file.startswith((_PATHS["purelib"], _PATHS["platlib"]))


@dataclass
class Captured:
    """A captured model.

    ``gm`` is the unlifted export graph on the meta device; ``aliases`` maps every name of a
    parameter or buffer of the model to all the names it has (tied weights have several;
    constants export lifted out of ``forward`` have none); ``tensors`` holds every parameter and
    buffer of the model (by first name, on the meta device), also those ``forward`` never reads;
    ``dim_names`` maps symbolic sizes to the names the user gave them.
    """

    gm: GraphModule
    aliases: dict[str, list[str]]
    persistent: dict[str, bool]
    training: bool
    dim_names: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def graph_name(self, name: str) -> str:
        """The name the graph reads a parameter or buffer by, from any of its names."""
        for target in self.aliases.get(name, ()):
            if target in self.used:
                return target
        return name

    @property
    def used(self) -> set[str]:
        return {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device.

    Tied parameters stay tied. Nothing of the size of the weights is allocated.
    """
    memo: dict[int, object] = {}
    for p in model.parameters(recurse=True):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers(recurse=True):
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


TARGET = "fxpar_target"  # the keyword a captured loss receives its target by


def with_loss(model: nn.Module, loss_fn) -> nn.Module:
    """``model`` whose forward returns ``loss_fn(output, fxpar_target)`` (``loss_fn(output)``
    without a target): the same parameters under the same names, so that the loss is part of the
    graph and can run split (cross-entropy over split logits never gathers them)."""
    wrapper = copy.copy(model)  # shares the submodules, parameters and buffers
    forward = model.forward

    def loss_forward(self, *args, fxpar_target=None, **kwargs):
        out = forward(*args, **kwargs)
        return loss_fn(out) if fxpar_target is None else loss_fn(out, fxpar_target)

    wrapper.forward = types.MethodType(loss_forward, wrapper)
    return wrapper


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` (a meta skeleton, changed in place) computing in ``dtype``: its floating
    parameters cast to it, and its floating tensor inputs cast to it as forward starts (FSDP's
    mixed precision does the same); buffers keep their dtype. The casts of the inputs are in the
    graph, so the user passes the inputs they pass the model."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    forward = model.forward

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def cast_forward(self, *args, **kwargs):
        args, kw = pytree.tree_map(cast, (args, {k: v for k, v in kwargs.items() if k != TARGET}))
        return forward(*args, **kw, **{k: v for k, v in kwargs.items() if k == TARGET})

    model.forward = types.MethodType(cast_forward, model)
    return model


def capture(model: nn.Module, args=(), kwargs=None, *, dynamic_shapes=None, loss_fn=None, dtype=None,
            autocast=None) -> Captured:
    """Capture ``model(*args, **kwargs)`` as an ATen-level ``GraphModule`` on the meta device.
    ``dtype``: the layers compute in it (``in_dtype``), while ``tensors`` describe fp32 master
    weights. ``autocast``: ``(device type, dtype)`` of a ``torch.autocast`` the call runs under,
    whose casts become nodes of the graph (``fxpar/autocast.py``).

    >>> from fxpar.models import mlp
    >>> model, args = mlp.build()
    >>> cap = capture(model, args)
    >>> any(n.target == torch.ops.aten.linear.default for n in cap.gm.graph.nodes)
    True
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"fxpar parallelizes torch.nn.Module instances; got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    _check_call(model, args, {k: v for k, v in kwargs.items() if k != TARGET})
    skeleton = meta_skeleton(model)
    skeleton.train(model.training)
    tensors = dict(skeleton.named_parameters())
    tensors.update(skeleton.named_buffers())
    if dtype is not None:  # the masters are fp32; the graph computes in ``dtype``
        tensors = {n: nn.Parameter(torch.empty_like(t, dtype=torch.float32), requires_grad=t.requires_grad)
                   if isinstance(t, nn.Parameter) and t.is_floating_point() else t for n, t in tensors.items()}
        skeleton = meta_skeleton(model)
        skeleton.train(model.training)
    fake = None
    if autocast:  # autocast applies to tensors of its device: export on fake ones of that device
        fake = FakeTensorMode(shape_env=ShapeEnv())
        skeleton = on_fake_device(skeleton, autocast[0], fake)
    if dtype is not None:
        skeleton = in_dtype(skeleton, dtype)
    if loss_fn is not None:
        skeleton = with_loss(skeleton, loss_fn)
    place = (lambda t: fake.from_tensor(torch.empty_like(t, device="meta")).to(autocast[0])) if fake else \
        (lambda t: torch.empty_like(t, device="meta"))
    meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, place, (tuple(args), kwargs))
    shapes, dim_names = _normalize_dynamic(dynamic_shapes)
    try:
        with RealConstants(), torch.autocast(*autocast) if autocast else contextlib.nullcontext():
            ep = torch.export.export(skeleton, meta_args, meta_kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the user's module and line
        raise CaptureError(_explain(e, skeleton)) from e
    gm = ep.module(check_guards=False)  # the runtime checks input shapes itself
    if fake is not None:
        onto_meta(gm, autocast[0], fake)
    _drop_export_guards(gm)
    _portable(gm)
    aliases, persistent = _names(model)
    lifted = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target not in aliases}
    check_constants(gm, lifted)
    index_runs_as_slices(gm)
    filled_buffers_as_cat(gm)
    if autocast:
        apply_autocast(gm, *autocast)
    sym_names = _symbol_names(gm, dim_names)
    return Captured(
        gm=gm, aliases=aliases, persistent=persistent, training=model.training, dim_names=sym_names, tensors=tensors
    )


def _check_call(model: nn.Module, args, kwargs) -> None:
    """The inputs fit ``model.forward``'s signature: a wrong name or count is the user's call to
    fix, said about their forward (export would report it from inside ``inspect``)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        where = ""
        try:
            file = inspect.getsourcefile(type(model).forward)
            line = inspect.getsourcelines(type(model).forward)[1]
            where = f"\n  {type(model).__name__}.forward is defined at {file}:{line}"
        except (TypeError, OSError):
            pass
        given = [f"{len(args)} positional"] + [repr(k) for k in kwargs]
        raise CaptureError(
            f"{type(model).__name__}.forward{sig} cannot take these inputs ({', '.join(given)}): {e}{where}\n"
            "What to do: call the model with the arguments its forward takes"
        ) from None


def _drop_export_guards(gm: GraphModule) -> None:
    """Remove export's input checks (made for meta inputs; the runtime checks input shapes itself
    and captures again for new ones) and reads of attributes nobody uses."""
    changed = False
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (node.op == "get_attr" and not node.users):
            gm.graph.erase_node(node)  # a get_attr nobody reads: e.g. the second name of a tied weight
            changed = True
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    if changed:
        gm.graph.lint()
        gm.recompile()


def _portable(gm: GraphModule) -> None:
    """Make the graph run on every device: the meta device accepts what some kernels do not.

    Model code that branches on the device type takes its non-CPU branch on meta (Hugging Face's
    grouped experts count tokens with ``histc`` of integers, which CUDA has and the CPU lacks):
    such integer inputs are counted as floats, exactly for any count below 2**24.
    """
    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not aten.histc.default:
            continue
        x = node.args[0]
        v = x.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.is_floating_point():
            continue
        with gm.graph.inserting_before(node):
            cast = gm.graph.call_function(aten.to.dtype, (x, torch.float32))
        cast.meta = {**x.meta, "val": v.to(torch.float32)}
        node.replace_input_with(x, cast)
        node.meta["val"] = node.meta["val"].to(torch.float32)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _names(model: nn.Module):
    """Every name of every parameter/buffer (tied ones share a list) and buffer persistence."""
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(t), []).append(name)
    aliases = {}
    for names in by_id.values():
        for n in names:
            aliases[n] = names
    persistent = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b in mod._buffers:
            full = f"{mod_name}.{b}" if mod_name else b
            persistent[full] = b not in mod._non_persistent_buffers_set
    return aliases, persistent


def _normalize_dynamic(dynamic_shapes):
    """Strings name a dynamic dimension; everything else passes through to torch.export."""
    if dynamic_shapes is None:
        return None, {}
    names: list[str] = []

    def conv(x):
        if isinstance(x, str):
            names.append(x)
            return Dim.DYNAMIC
        return x

    shapes = pytree.tree_map(conv, dynamic_shapes, is_leaf=lambda x: isinstance(x, (str, type(Dim.DYNAMIC))))
    return shapes, {"_order": names}


def _symbol_names(gm: GraphModule, dim_names) -> dict[str, str]:
    """Map the symbols export chose (``s0``) to the names the user gave (``batch``)."""
    order = list(dim_names.get("_order", []))
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        for size in node.meta["val"].shape:
            if isinstance(size, torch.SymInt) and order:
                sym = str(size.node.expr)
                if sym not in out:
                    out[sym] = order.pop(0)
    return out


_HINTS = [
    (
        "DynamicCache",
        "the model returns a key/value cache object; pass use_cache=False in example_kwargs "
        "or set model.config.use_cache = False before parallelizing",
    ),
    (
        "data-dependent",
        "the code branches on tensor values (e.g. `if x.sum() > 0`, `.item()`, `.tolist()`); "
        "make the branch depend on shapes or config values, or move it out of forward",
    ),
    (
        "Constraints violated",
        "a dimension marked dynamic was specialized by the model's code; mark fewer dimensions "
        "dynamic or give them ranges the code accepts",
    ),
]


def _explain(e: Exception, skeleton: nn.Module) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where_mod, where_line = _user_location(e, skeleton)
    hint = next((h for key, h in _HINTS if key in str(e) or key in type(e).__name__), None)
    lines = [f"fxpar could not capture {type(skeleton).__name__} as a graph: {type(e).__name__}: {msg}"]
    if where_mod:
        lines.append(f"  in module {where_mod}")
    if where_line:
        lines.append(f"  at {where_line}")
    lines.append(
        "What to do: "
        + (
            hint
            or "typical reasons are data-dependent control flow, in-place edits of inputs or "
            "unsupported Python objects in the outputs; run torch.export.export(model, args, "
            "strict=False) on the model alone to see the full report"
        )
    )
    return "\n".join(lines)


def _user_location(e: Exception, skeleton: nn.Module):
    names = {id(m): (n or "<root>") for n, m in skeleton.named_modules()}
    module = line = None
    tb = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        obj = frame.f_locals.get("self")
        if module is None and isinstance(obj, nn.Module) and id(obj) in names:
            module = f"'{names[id(obj)]}' ({type(obj).__name__})"
    for fs in reversed(traceback.extract_tb(e.__traceback__)):
        if not _not_the_users(fs.filename):
            line = f"{fs.filename}:{fs.lineno}: {(fs.line or '').strip()}"
            break
    return module, line
