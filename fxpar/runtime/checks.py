"""What the ranks of one ``ParallelModule`` must agree on, and how a difference is worded.

Every rank builds its program from its own copy of the model, its own options and its own
inputs. They must be one model, one set of options and, within a model replica (the tp, cp and pp
ranks of one dp/ep position), one batch: otherwise the ranks compute parts of different things and
their sum is garbage, with no error. ``ParallelModule`` checks each with ``agree`` (fixed-size
digests first, see ``fxpar/runtime/agree.py``): options and model when it is made, inputs at the
first call of every input signature (``check_inputs``), the plan after planning.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch.utils import _pytree as pytree

from ..capture import TARGET
from ..errors import FxparError
from ..options import plain
from .agree import describe_ranks, differences, tensor_digest

REPLICA_HINT = (
    "Only data-parallel replicas (the dp and ep dimensions) take their own part of the batch "
    "(part mesh.replica(rank) of mesh.replicas); every tensor-, context- and pipeline-parallel rank of a "
    "replica must be given the same tensors"
)


def callable_name(fn) -> str | None:
    """A name for ``fn`` that is the same in every process (no addresses)."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)})"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


# options ----------------------------------------------------------------------------------------
def explain_options(summaries: list, ranks: list[int]) -> str:
    """The error for ranks given different options (``summaries``: each rank's, by name)."""
    lines = differences(summaries, ranks)
    return ("the ranks were given different options for fxpar.parallelize:\n  " + "\n  ".join(lines)
            + "\nEvery rank must call fxpar.parallelize with the same mesh and options.")


# the model --------------------------------------------------------------------------------------
def model_structure(model: torch.nn.Module) -> dict:
    """``{name: [shape, dtype, has values]}`` of every parameter and buffer, under all its names."""
    out = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        out[name] = [list(t.shape), str(t.dtype).replace("torch.", ""), t.device.type != "meta"]
    return out


def model_values(model: torch.nn.Module) -> dict:
    """``{name: digest}`` of every parameter and buffer that holds values (meta tensors have none)."""
    out, seen = {}, {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "meta":
            key = id(t)
            if key not in seen:
                seen[key] = tensor_digest(t)
            out[name] = seen[key]
    return out


def explain_structure(summaries: list, ranks: list[int]) -> str:
    """The error for ranks holding models of other structures (``model_structure`` of each)."""
    counts = [len(s) for s in summaries]
    if len(set(counts)) > 1:
        stack = _layer_stack(summaries)
        parts = []
        for i, (rank, s) in enumerate(sorted(zip(ranks, summaries), key=lambda rs: -len(rs[1]))):
            if not stack:
                parts.append(f"rank {rank} has {len(s)} parameters and buffers")
            elif i == 0:
                parts.append(f"rank {rank} has {_layers(s, stack)} layers' parameters in '{stack}' ({len(s)} tensors)")
            else:
                parts.append(f"rank {rank} has {_layers(s, stack)} ({len(s)})")
        only = _only_on(summaries, ranks)
        lines = ["the ranks hold different models: " + ", ".join(parts) + (f"; {only}" if only else "")]
    else:
        meta = [(r, [k for k, v in s.items() if not v[2]]) for r, s in zip(ranks, summaries)]
        if len({len(m) for _, m in meta}) > 1 and any(not m for _, m in meta):
            on_meta = [r for r, m in meta if m]
            return (f"the model is on the meta device on {describe_ranks(on_meta)} but holds values elsewhere: "
                    "build it the same way on every rank (all on the meta device, then fxpar.load, or all with values)")
        lines = ["the ranks hold different models (parameters and buffers: [shape, dtype, has values]):"]
        lines += ["  " + line for line in differences(summaries, ranks)]
    return "\n".join(lines) + "\nEvery rank must build the same model (same class and configuration)."


def explain_values(summaries: list, ranks: list[int]) -> str:
    """The error for ranks holding different values (``model_values`` of each)."""
    names = [k for k in summaries[0] if len({s.get(k) for s in summaries}) > 1]
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    bad = [r for r, s in zip(ranks, summaries) if s.get(names[0]) != summaries[0].get(names[0])]
    return (
        f"ranks hold different values for '{names[0]}'{more}: {describe_ranks(bad)} differ from rank {ranks[0]}. "
        "Build the model with the same seed on every rank (torch.manual_seed) or load the same weights"
    )


def _layer_stack(summaries: list) -> str | None:
    """The numbered module list with the most entries on any rank ('transformer.h')."""
    best, most = None, 0
    for s in summaries:
        stacks: dict[str, set] = {}
        for name in s:
            parts = name.split(".")
            for i, p in enumerate(parts):
                if p.isdigit() and i:
                    stacks.setdefault(".".join(parts[:i]), set()).add(p)
        for stack, idx in stacks.items():
            if len(idx) > most:
                best, most = stack, len(idx)
    return best


def _layers(summary: dict, stack: str) -> int:
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.")
    return len({m.group(1) for name in summary for m in [pattern.match(name)] if m})


def _only_on(summaries: list, ranks: list[int]) -> str:
    for rank, s in zip(ranks, summaries):
        for name in s:
            if any(name not in other for other in summaries):
                return f"e.g. '{name}' is on rank {rank} only"
    return ""


# inputs -----------------------------------------------------------------------------------------
def input_names(forward, args, kwargs) -> list[str]:
    """A name for every leaf of ``(args, kwargs)``, as the user knows it: ``idx``,
    ``attention_mask``, ``target``, ``args[2]`` or ``batch['ids']``."""
    fn, bound = getattr(forward, "__func__", forward), hasattr(forward, "__func__")
    try:
        positional = _positional(fn, bound)
    except TypeError:  # an unhashable callable
        positional = _positional.__wrapped__(fn, bound)
    names = []
    for path, _ in pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]:
        top, key = path[0].idx, path[1]
        if top == 0:
            base = positional[key.idx] if key.idx < len(positional) else f"args[{key.idx}]"
        else:
            base = "target" if key.key == TARGET else str(key.key)
        names.append(base + pytree.keystr(path[2:]))
    return names


@functools.lru_cache(maxsize=64)
def _positional(fn, bound: bool) -> list[str]:
    """The names of ``fn``'s positional parameters (``self`` left out of a method's)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[1:] if bound else names


def input_summaries(forward, args, kwargs, dynamic: dict | None, digests: bool = True) -> tuple[dict, dict]:
    """``(signature, contents)`` of a call's inputs: what every rank must agree on (structure,
    shapes with symbolic dims left out, dtypes, Python values) and what the ranks of one replica
    must agree on besides (every tensor's exact digest; without ``digests``, none)."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    names = input_names(forward, args, kwargs)
    signature, contents = {"structure": str(spec)}, {}
    k = 0
    for name, x in zip(names, leaves):
        if isinstance(x, torch.Tensor):
            dims = (dynamic or {}).get(k, ())
            k += 1
            meta = x.device.type == "meta"
            shape = ", ".join("*" if d in dims else str(s) for d, s in enumerate(x.shape))
            dtype = str(x.dtype).replace("torch.", "")
            signature[name] = f"({shape}) {dtype}" + (" on the meta device" if meta else "")
            value = "meta" if meta else tensor_digest(x) if digests else None
            contents[name] = [list(x.shape), dtype, value]
        else:
            signature[name] = repr(plain(x))
    return signature, contents


def explain_signature(summaries: list, ranks: list[int]) -> str:
    """The error for ranks called with inputs of different kinds (``input_summaries``' first)."""
    lines = differences(summaries, ranks)
    return ("the ranks were called with inputs of different shapes, types or structure (*: a dynamic size):\n  "
            + "\n  ".join(lines)
            + "\nEvery rank must call the model with the same kinds of inputs (data-parallel replicas: their equal "
              "parts of the batch)")


def explain_contents(classes: list[int]):
    """Words the difference between ranks of one replica (``classes[i]``: the replica of member i)."""

    def explain(summaries: list, ranks: list[int]) -> str:
        for c in sorted(set(classes)):
            members = [i for i, ci in enumerate(classes) if ci == c]
            first = summaries[members[0]]
            for i in members[1:]:
                other = summaries[i]
                for name in first:
                    if first[name] != other.get(name):
                        a, b = ranks[members[0]], ranks[i]
                        same_kind = first[name][:2] == (other.get(name) or [None, None])[:2]
                        if same_kind:
                            what = f"its values differ; {_shape_text(first[name])} on both"
                        else:
                            what = f"{_shape_text(first[name])} on rank {a}, {_shape_text(other.get(name))} on rank {b}"
                        return (f"ranks {a} and {b} belong to one model replica but were given different inputs: "
                                f"argument '{name}' differs ({what}). {REPLICA_HINT}.")
        return "ranks of one model replica were given different inputs. " + REPLICA_HINT

    return explain


def _shape_text(entry) -> str:
    return "missing" if entry is None else f"shape {tuple(entry[0])} {entry[1]}"


def check_not_meta(contents: dict, where: str = "") -> None:
    """Inputs must hold values: a model runs on real tensors (plan with ``fxpar.compile``).
    ``contents``: the second of ``input_summaries``; ``where``: the call, for the message."""
    meta = [name for name, v in contents.items() if v[2] == "meta"]
    if meta:
        raise FxparError(
            f"{where}input '{meta[0]}' is on the meta device, which holds no values: call the model with real "
            "tensors (the model itself may be built on the meta device and filled with fxpar.load); to plan "
            "without running, use fxpar.compile"
        )


# the plan ---------------------------------------------------------------------------------------
def plan_summary(ctx) -> dict:
    """What decides which parameters a rank holds and what it sends: placements, stages, experts."""
    return {
        "placements": {k: repr(v) for k, v in ctx.param_placements.items()},
        "stages": [[s.rank, sorted(s.params)] for s in ctx.pipeline.stages] if ctx.pipeline else [],
        "experts": {k: repr(v) for k, v in ctx.expert_shards.items()},
    }


def explain_plan(summaries: list, ranks: list[int]) -> str:
    """The error for ranks whose plans differ (``plan_summary`` of each)."""
    lines = differences([{"placements": s["placements"]} for s in summaries], ranks, limit=1) or \
        differences(summaries, ranks, limit=1)
    return ("the ranks planned the model differently, though they agree on the model, the options and the inputs "
            "(model code that depends on the process, e.g. on the rank or on the hash of a string): "
            + "; ".join(lines)[:2000])


# train_step -------------------------------------------------------------------------------------
def check_loss_call(loss_fn, target) -> None:
    """``loss_fn`` can be called the way ``train_step`` will call it, checked on every rank
    before anything is sent (the last stage alone would find out, while the others wait)."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        if target is None:
            sig.bind(None)
        else:
            sig.bind(None, target)
    except TypeError:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        if target is None:
            raise FxparError(
                f"train_step was called without target=, so it calls loss_fn(output), but {name}{sig} needs more: "
                "pass train_step(*inputs, target=...) on every rank"
            ) from None
        raise FxparError(
            f"train_step(..., target=...) calls loss_fn(output, target), but {name}{sig} does not take a target: "
            "give fxpar.parallelize a loss_fn(output, target), or call train_step without target="
        ) from None
