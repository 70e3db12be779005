"""Error types, and the helpers that make every message name the module, the graph node and the
user's source line."""

from __future__ import annotations

import os
import re

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>[^\n]*)')


class FxparError(Exception):
    """Base class of the errors fxpar raises on purpose."""


class MeshError(FxparError, ValueError):
    """A mesh that does not fit the world, the model or the options."""


class CaptureError(FxparError, RuntimeError):
    """The model could not be turned into a graph."""


class PlanError(FxparError, RuntimeError):
    """A pass could not plan or rewrite the graph."""


class DivergenceError(FxparError, AssertionError):
    """A parallel plan computed something other than the single-device model."""


class CollectiveError(FxparError, RuntimeError):
    """A collective failed or timed out (often because another rank failed)."""


class RankMismatchError(FxparError, RuntimeError):
    """Ranks that must agree (on their inputs, their model or their options) do not; raised on
    every rank, naming what differs and where."""


class OptionError(FxparError, ValueError):
    """An option of ``compile``/``parallelize`` (or an ``FXPAR_*`` environment variable) that
    fxpar cannot take."""


class CheckpointError(FxparError, RuntimeError):
    """A checkpoint that cannot be saved or loaded: missing, incomplete, damaged, of another
    model, or not one fxpar may read."""


def user_frame(stack_trace: str | None) -> tuple[str, int, str] | None:
    """The innermost frame of ``stack_trace`` outside torch itself: ``(file, line, code)``."""
    if not stack_trace:
        return None
    frames = [m for m in _FRAME.finditer(stack_trace)]
    for m in reversed(frames):
        if not m.group("file").startswith(_TORCH_DIR):
            return m.group("file"), int(m.group("line")), m.group("code").strip()
    if frames:
        m = frames[-1]
        return m.group("file"), int(m.group("line")), m.group("code").strip()
    return None


def module_path(node) -> str:
    """The dotted name of the innermost module a node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def module_class(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _path, cls = list(stack.values())[-1]
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


def _clean_path(path: str) -> str:
    # export writes "L['self'].layers[0].attn" or "layers.0.attn" depending on the version
    path = re.sub(r"L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def source_line(node) -> str:
    frame = user_frame(node.meta.get("stack_trace"))
    if frame is None:
        return "<source line unknown>"
    file, line, code = frame
    return f"{file}:{line}: {code}"


def describe_node(node) -> str:
    """A few lines naming a node for an error message: op, module and user source line."""
    mod = module_path(node)
    cls = module_class(node)
    where = f"module '{mod}' ({cls})" if mod else (f"the root module ({cls})" if cls else "the root module")
    try:
        op = node.format_node()
    except Exception:  # noqa: BLE001 - formatting must never hide the real error
        op = f"{node.op} {node.target}"
    return f"node {node.name}: {op}\n  in {where}\n  at {source_line(node)}"
