"""Rewrites of the captured graph into the forms the planner reads, each keeping every value and
gradient as it was:

* ``index_runs_as_slices``: ``x[..., [-2], :]`` (an index by a constant run of positions, as
  Falcon takes its key head) becomes the slice it is; a slice of a split dim keeps its layout,
  an index by a tensor would gather it;
* ``filled_buffers_as_cat``: a buffer made with ``new_empty`` and filled piece by piece with
  ``copy_`` into slices of it (DeepSeek-V3 assembles its keys so) becomes the ``cat`` of the
  pieces; in-place writes through views have no placement of their own, a ``cat`` has.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .constants import constant_value

aten = torch.ops.aten
_BUFFERS = (aten.new_empty.default, aten.new_zeros.default, aten.empty.memory_format, aten.zeros.default)


def index_runs_as_slices(gm: GraphModule) -> None:
    """``aten.index(x, [None, ..., c])`` with ``c`` a constant run of increasing positions ->
    ``aten.slice(x, dim, start, stop)``: the same values and gradients."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not aten.index.Tensor:
            continue
        x, indices = node.args[0], list(node.args[1])
        given = [d for d, i in enumerate(indices) if i is not None]
        if len(given) != 1:
            continue
        dim = given[0]
        value = constant_value(gm, indices[dim])
        size = x.meta["val"].shape[dim] if isinstance(x.meta.get("val"), torch.Tensor) else None
        if value is None or value.dim() != 1 or value.numel() == 0 or value.is_floating_point() or value.dtype == torch.bool:
            continue
        if not isinstance(size, int):
            continue
        values = value.tolist()
        if not all(-size <= v < size for v in values):
            continue  # out of range: left for the op to refuse, as it would on one device
        pos = [v % size for v in values]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            continue
        with gm.graph.inserting_before(node):
            cut = gm.graph.call_function(aten.slice.Tensor, (x, dim, pos[0], pos[0] + len(pos)))
        cut.meta = dict(node.meta)
        node.replace_all_uses_with(cut)
        const = indices[dim]
        gm.graph.erase_node(node)
        # the constant's copy and detach (in place, so never dead code to fx) go with it
        while isinstance(const, Node) and not const.users:
            up = const.args[0] if const.op == "call_function" else None
            gm.graph.erase_node(const)
            const = up
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()



def filled_buffers_as_cat(gm: GraphModule) -> None:
    """``buf = x.new_empty(shape); buf[..., a:b].copy_(p); buf[..., b:c].copy_(q)`` with the
    slices tiling one dim of ``buf`` -> ``buf = cat([p', q'], dim)`` (each piece broadcast and cast
    the way ``copy_`` would), for every use of ``buf`` after the last copy."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for buf in list(gm.graph.nodes):
        if buf.target not in _BUFFERS or not isinstance(buf.meta.get("val"), torch.Tensor):
            continue
        filled = _tiling(buf)
        if filled is None:
            continue
        dim, copies, readers = filled
        last = max(copies, key=order.__getitem__)
        if any(order[r] < order[last] for r in readers):
            continue
        val = buf.meta["val"]
        parts = []
        with gm.graph.inserting_before(last.next):  # in the order made (``inserting_after`` reverses it)
            for copy in sorted(copies, key=lambda c: c.args[0].args[2]):
                piece, src = copy.args[0], copy.args[1]
                shape = list(piece.meta["val"].shape)
                part = src
                if tuple(src.meta["val"].shape) != tuple(shape):
                    part = gm.graph.call_function(aten.expand.default, (part, shape))
                    part.meta = {**src.meta, "val": src.meta["val"].expand(shape)}
                if src.meta["val"].dtype != val.dtype:
                    cast = gm.graph.call_function(aten.to.dtype, (part, val.dtype))
                    cast.meta = {**part.meta, "val": part.meta["val"].to(val.dtype)}
                    part = cast
                parts.append(part)
            cat = gm.graph.call_function(aten.cat.default, (parts, dim))
        cat.meta = dict(buf.meta)
        for r in readers:
            r.replace_input_with(buf, cat)
        for copy in copies:
            piece = copy.args[0]
            gm.graph.erase_node(copy)
            gm.graph.erase_node(piece)
        gm.graph.erase_node(buf)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _tiling(buf: Node):
    """``(dim, copies, other readers)`` when ``buf`` is written only by ``copy_`` into static
    slices along one dim that tile it exactly, each slice read by nothing but its copy."""
    size = tuple(buf.meta["val"].shape)
    copies, readers, pieces, dim = [], [], [], None
    for user in buf.users:
        if user.target == aten.slice.Tensor and user.args[0] is buf:
            if len(user.users) != 1 or next(iter(user.users)).target != aten.copy_.default:
                return None
            copy = next(iter(user.users))
            if copy.args[0] is not user or copy.users or len(user.args) < 4:
                return None
            d = user.args[1] % len(size)
            step = user.args[4] if len(user.args) > 4 else 1
            start, end = user.args[2], user.args[3]
            if dim not in (None, d) or step != 1 or not isinstance(start, int) or not isinstance(end, int):
                return None
            if not isinstance(size[d], int):
                return None
            dim = d
            pieces.append((max(0, start + size[d]) if start < 0 else start, min(end, size[d])))
            copies.append(copy)
        else:
            readers.append(user)
    if dim is None or not readers:
        return None
    pieces.sort()
    if pieces[0][0] != 0 or pieces[-1][1] != size[dim] or any(a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
        return None
    return dim, copies, readers
