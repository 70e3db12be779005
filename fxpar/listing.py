"""A rank's program as code a person would write: what ``plan.dump`` and ``plan.rank_code`` show.

The module a rank runs is a ``GraphModule`` whose generated code is written for the interpreter
(every value's last use freed with ``x = None``, weights read in a preamble, positional
arguments). The listing renders the same graph for reading:

* lines grouped by the module they come from, each group under a one-line header naming the
  module and what tensor parallelism did to its layers
  (``# transformer.h.0.attn (CausalSelfAttention): column-parallel c_attn (3 segments), ...``),
  the module bound once (``attn = self.transformer.h[0].attn``) and its weights read from it;
* the user's source line above the lines it became, its path relative to the model's package;
* fxpar's ops by name with keyword arguments (``fxpar.all_reduce(x, group="tp")``), ATen ops
  without their overload and trailing defaults;
* after each line the value's placement and local shape, and for a collective the bytes this rank
  sends; a line too long for both gets its note on a line of its own above it.

The listing is valid Python (it compiles) but reads ``fxpar.<op>`` as the op vocabulary of
``fxpar/ops``; run the ``GraphModule`` itself (``plan.rank_module``) to execute a rank.
"""

from __future__ import annotations

import inspect
import keyword
import operator
import os
import sys
import textwrap

import torch
from torch.fx import GraphModule, Node

from .errors import user_frame
from .metadata import COMM, DECISION, PLACEMENT
from .placement import Shard

WIDTH = 110  # longest line a note may extend; longer code wraps its arguments
_INFIX = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
          operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@"}
_STYLES = {"colwise": "column-parallel", "rowwise": "row-parallel", "vocab": "vocab-parallel",
           "replicate": "replicated"}


def rank_listing(module: GraphModule, title: str, global_gm: GraphModule) -> str:
    """``module``'s code (a rank's whole program or one pipeline stage) as a listing under the
    one-line ``title``; notes come from the planned ``global_gm`` (placements, collectives)."""
    from .report import fmt_bytes, local_shape

    by_name = {n.name: n for n in global_gm.graph.nodes}
    notes: dict[str, str] = {}
    for node in global_gm.graph.nodes:
        place, c = node.meta.get(PLACEMENT), node.meta.get(COMM)
        note = [] if place is None else [f"{place!r} {local_shape(node.meta.get('val'), place)}"]
        if c is not None:  # the op and its group are on the line already
            note.append(f"sends {fmt_bytes(c.bytes)} fwd, {fmt_bytes(c.bwd_bytes)} bwd")
        notes[node.name] = "; ".join(note)
    return _Listing(module, by_name, notes).render(title)


class _Listing:
    def __init__(self, module: GraphModule, by_name: dict, notes: dict):
        self.module, self.by_name, self.notes = module, by_name, notes
        self.nodes, self.regions, self.alias = _inline_regions(module)
        nodes = self.nodes
        self.stacks = {n: _stack(self.by_name.get(n.name, n)) for n in nodes}
        paths = {p for s in self.stacks.values() for p, _ in s}
        # a module that no traced module sits inside is a layer (Linear, LayerNorm): its lines
        # belong to the module that calls it
        self.layers = {p for p in paths if p and not any(q.startswith(p + ".") for q in paths)}
        self.names = {n.name for n in nodes}
        self.bound: dict[str, str] = {}  # module path -> the local name bound to it
        self.root = _package_dir(nodes)
        self.group = {n: self._group(n) for n in nodes}
        self.members: dict[str, list[Node]] = {}
        for n in nodes:
            self.members.setdefault(self.group[n], []).append(n)

    def render(self, title: str) -> str:
        out = [f"# {title}", "# After each line: placement over tp, local shape; for collectives the bytes sent.",
               "# fxpar.<op>: fxpar's ops (fxpar/ops); aten.<op>: torch.ops.aten.", ""]
        nodes = self.nodes
        inputs = [n.name for n in nodes if n.op == "placeholder"]
        out.append(f"def forward(self, {', '.join(inputs)}):" if inputs else "def forward(self):")
        group, source, headed = None, None, set()
        for node in nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                out.append(self._line(f"return {self._value(node.args[0])}", ""))
                continue
            if node in self.regions:  # its lines follow
                region = self.regions[node]
                out += textwrap.wrap(f"backward recomputes the lines down to {', '.join(self._value(o) for o in region.outputs)} from "
                                     f"{', '.join(a.name for a in node.args if a.op != 'get_attr')} ({region.name})", WIDTH,
                                     initial_indent="    # ", subsequent_indent="    #   ")
                continue
            here = self.group[node]
            if here != group:
                group, source = here, None
                first = here not in headed
                headed.add(here)
                head = self._header(here) if first else (here or "model")
                out += [""] + textwrap.wrap(head, WIDTH, initial_indent="    # ", subsequent_indent="    #   ",
                                            break_on_hyphens=False)
                reads = any(a.op == "get_attr" for n in self.members[here] for a in n.all_input_nodes)
                if first and here and reads:
                    out.append(f"    {self._bind(here)} = {_attr_expr('self', here)}")
            src = self._source(node)
            if src and src != source:  # the line number finds the rest of a long one
                out.append(f"    # {src}" if len(src) + 6 <= WIDTH else f"    # {src[:WIDTH - 9]} ...")
                source = src
            out.append(self._line(f"{node.name} = {self._call(node)}", self.notes.get(node.name, "")))
        return "\n".join(out) + "\n"

    # grouping -------------------------------------------------------------------------------
    def _group(self, node: Node) -> str:
        stack = self.stacks[node]
        weight = bool(node.args) and isinstance(node.args[0], Node) and node.args[0].op == "get_attr"
        if len(stack) <= 1 and weight and _is_fxpar(node.target) and node.users:
            # a collective inserted on a weight (a bias made a partial sum) reads as part of the
            # module that uses it
            return self._group(next(iter(node.users)))
        for path, _ in reversed(stack):
            if path not in self.layers:
                return path
        return ""

    def _header(self, path: str) -> str:
        members = self.members[path]
        cls = next((c for n in members for p, c in self.stacks[n] if p == path), "")
        seen: dict[str, str] = {}
        styles: dict[str, str] = {}
        for n in members:
            g = self.by_name.get(n.name, n)
            decision = g.meta.get(DECISION)
            layer = self.stacks[n][-1][0] if self.stacks[n] else ""
            if decision is None or layer in seen or layer == path:
                continue
            seen[layer] = _weight_layout(g)
            styles[layer] = _style(decision)
        name = path or "model"
        head = f"{name} ({cls.rsplit('.', 1)[-1]})" if cls else name
        layers = [f"{styles[layer]} {layer[len(path) + 1:] if path else layer}{how}" for layer, how in seen.items()]
        return head + (": " + ", ".join(layers) if layers else "")

    def _bind(self, path: str) -> str:
        if path not in self.bound:
            last = path.rsplit(".", 1)[-1]
            if last.isdigit():
                parent = path.rsplit(".", 2)[-2] if path.count(".") else "layer"
                last = f"{parent}_{last}"
            name = last if last.isidentifier() and not keyword.iskeyword(last) else "mod"
            while name in self.names or name in self.bound.values() or name == "self":
                name += "_"
            self.bound[path] = name
        return self.bound[path]

    # expressions -----------------------------------------------------------------------------
    def _call(self, node: Node) -> str:
        args = [self._value(a) for a in node.args]
        if node.op == "call_module":
            return f"{_attr_expr('self', node.target)}({', '.join(args)})"
        target = node.target
        if target is operator.getitem:
            if node.args[0] in self.regions:  # a value the region makes, by its own name
                return self._value(self.regions[node.args[0]].outputs[node.args[1]])
            return f"{args[0]}[{args[1]}]"
        if target in _INFIX and len(args) == 2:
            return f"{args[0]} {_INFIX[target]} {args[1]}"
        if isinstance(target, torch._ops.OpOverload):
            return self._op(node, target)
        name = getattr(target, "__name__", str(target))
        if _is_fxpar(target):
            return self._keywords(f"fxpar.{name}", node, _python_params(target))
        module = getattr(target, "__module__", None)
        qual = f"{'torch' if module and module.startswith('torch') else module}.{name}" if module else name
        return f"{qual}({', '.join(args + [f'{k}={self._value(v)}' for k, v in node.kwargs.items()])})"

    def _op(self, node: Node, target) -> str:
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        params = [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty)
                  for a in target._schema.arguments]
        if ns == "fxpar":
            return self._keywords(f"fxpar.{name}", node, params)
        # positional up to the last tensor, then by name where not the default, as one writes
        # ``scaled_dot_product_attention(q, k, v, is_causal=True)``
        last = max((i for i, a in enumerate(node.args) if _has_node(a)), default=len(node.args) - 1)
        parts = [self._value(a) for a in node.args[:last + 1]]
        named = [(params[i][0], a) for i, a in enumerate(node.args) if i > last and i < len(params)]
        for key, v in named + list(node.kwargs.items()):
            default = dict(params).get(key, inspect.Parameter.empty)
            if not _is_default(v, default) and not (key == "pin_memory" and v is False):
                parts.append(f"{key}={self._value(v)}")
        return f"{ns}.{name}({', '.join(parts)})"

    def _keywords(self, qual: str, node: Node, params) -> str:
        """The first argument as given, every other one by name, defaults left out except the
        mesh dimension (which group a collective runs over is the point of reading it)."""
        parts = []
        for i, a in enumerate(node.args):
            if i == 0 or i >= len(params):
                parts.append(self._value(a))
            elif params[i][0] == "group" or not (a is None or _is_default(a, params[i][1])):
                parts.append(f"{params[i][0]}={self._value(a)}")
        defaults = dict(params)
        for k, v in node.kwargs.items():
            if k == "group" or not _is_default(v, defaults.get(k, inspect.Parameter.empty)):
                parts.append(f"{k}={self._value(v)}")
        return f"{qual}({', '.join(parts)})"

    def _value(self, a) -> str:
        if isinstance(a, Node) and a in self.alias:
            return self._value(self.alias[a])
        if isinstance(a, Node):
            if a.op == "get_attr":
                path, _, attr = a.target.rpartition(".")
                owner = self._owner_of(path)
                rest = path[len(owner) + 1:] if owner and path != owner else ("" if owner else path)
                base = self._bind(owner) if owner else "self"
                return _attr_expr(base, ".".join(p for p in (rest, attr) if p))
            return a.name
        if isinstance(a, str):
            return '"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(a, torch.device):
            return f'"{a}"'
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self._value(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else (f"({inner},)" if len(a) == 1 else f"({inner})")
        if isinstance(a, dict):
            return "{" + ", ".join(f"{self._value(k)}: {self._value(v)}" for k, v in a.items()) + "}"
        return repr(a)

    def _owner_of(self, path: str) -> str:
        """The bound module (the deepest group containing ``path``) a weight is read from."""
        best = ""
        for p in self.bound:
            if (path == p or path.startswith(p + ".")) and len(p) > len(best):
                best = p
        return best

    # lines ----------------------------------------------------------------------------------
    def _source(self, node: Node) -> str | None:
        frame = user_frame(self.by_name.get(node.name, node).meta.get("stack_trace"))
        if frame is None:
            return None
        path, line, code = frame
        return f"{_relative(path, self.root)}:{line}  {code}"

    def _line(self, code: str, note: str) -> str:
        code = "    " + code
        if not note:
            return _wrap(code)
        if len(code) + 4 + len(note) <= WIDTH:
            return f"{code}  # {note}"
        above = textwrap.wrap(note, WIDTH, initial_indent="    # ", subsequent_indent="    #   ")
        return "\n".join(above + [_wrap(code)])


class _Region:
    def __init__(self, name: str, outputs: tuple):
        self.name, self.outputs = name, outputs


def _inline_regions(module: GraphModule) -> tuple[list[Node], dict[Node, _Region], dict[Node, Node]]:
    """The module's nodes with each recomputed region's call followed by the region's own nodes,
    so the listing shows what backward remakes where the forward runs it; the regions by their
    call; the value outside each region's input stands for."""
    from .runtime.recompute import Recomputed

    nodes, regions, alias = [], {}, {}
    for n in module.graph.nodes:
        nodes.append(n)
        sub = module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(sub, Recomputed):
            inner = list(sub.body.graph.nodes)
            alias.update(zip((x for x in inner if x.op == "placeholder"), n.args))
            regions[n] = _Region(sub.region, tuple(inner[-1].args[0]))
            nodes += [x for x in inner if x.op not in ("placeholder", "output")]
    return nodes, regions, alias


def _stack(node: Node) -> list[tuple[str, str]]:
    from .errors import _clean_path

    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((_clean_path(path), cls))
    return out


def _is_fxpar(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "fxpar"
    return getattr(target, "__module__", "").startswith("fxpar.ops")


def _has_node(a) -> bool:
    if isinstance(a, Node):
        return True
    return isinstance(a, (list, tuple)) and any(_has_node(x) for x in a)


def _style(decision) -> str:
    style = getattr(decision, "style", decision)
    if style.startswith("follows input"):
        return "split like its input"
    return _STYLES.get(style, style)


def _weight_layout(node: Node) -> str:
    """How the weight of a split layer is stored, where it is not one even slice per rank."""
    for a in node.all_input_nodes:
        place = a.meta.get(PLACEMENT)
        if a.op != "get_attr" or not isinstance(place, Shard) or place.is_even:
            continue
        if place.has_duplicates:
            return f" (rows shared by up to {int(place._owners.max())} ranks)"
        runs = len(place.runs[0])
        if runs > 1 and all(len(r) == runs for r in place.runs):
            return f" ({runs} segments)"
        return " (uneven)"
    return ""


def _is_default(value, default) -> bool:
    if default is inspect.Parameter.empty:
        return False
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # noqa: BLE001 - tensors and symbols compare as not default
        return False


def _python_params(fn) -> list:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [(p.name, p.default) for p in sig.parameters.values()]


def _attr_expr(base: str, path: str) -> str:
    out = base
    for part in path.split(".") if path else []:
        if part.isdigit():
            out += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            out += f".{part}"
        else:
            out = f"getattr({out}, {part!r})"
    return out


def _package_dir(nodes) -> str | None:
    """The folder of the package the model's class comes from: source paths are shown from there."""
    for n in nodes:
        for path, cls in _stack(n):
            if path == "" and "." in cls:
                module = cls.rsplit(".", 1)[0]
                package = module.rpartition(".")[0]
                mod = sys.modules.get(package) if package else None
                if mod is not None and getattr(mod, "__path__", None):
                    return list(mod.__path__)[0]
                mod = sys.modules.get(module)
                return os.path.dirname(getattr(mod, "__file__", "") or "") or None
    return None


def _relative(path: str, root: str | None) -> str:
    """``path`` from the model's package, else from the ``sys.path`` entry holding it."""
    path = os.path.abspath(path)
    bases = ([root] if root else []) + sorted((p for p in sys.path if p), key=len, reverse=True)
    for base in bases:
        base = os.path.abspath(base)
        if path.startswith(base + os.sep):
            return os.path.relpath(path, base)
    return os.path.basename(path)


def _wrap(code: str) -> str:
    """A call longer than ``WIDTH`` with its arguments on the lines below, one per line."""
    if len(code) <= WIDTH or not code.endswith(")") or "(" not in code:
        return code
    head, _, body = code.partition("(")
    parts, depth, cur, quote = [], 0, "", ""
    for ch in body[:-1]:
        if quote:
            quote = "" if ch == quote and not cur.endswith("\\") else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        else:
            depth += ch in "([{"
            depth -= ch in ")]}"
        cur += ch
    parts.append(cur.strip())
    indent = " " * (len(code) - len(code.lstrip()) + 4)
    one = indent + ", ".join(p for p in parts if p)
    if len(one) <= WIDTH:
        return f"{head}(\n{one},\n{indent[:-4]})"
    return head + "(\n" + "".join(f"{indent}{p},\n" for p in parts if p) + indent[:-4] + ")"
