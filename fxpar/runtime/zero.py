"""A rank's weights as ``zero`` and ``precision`` hold them: rows of each weight over the
data-parallel ranks, fp32 masters of weights the layers read in bf16.

``hold_weights`` turns the whole (tp-local) weights ``populate`` registered into the rows this
dp rank holds, registered under every original name in their place, so that ``pm.parameters()``,
``state_dict()``, optimizers and checkpoints see the rows (the masters); ``finish`` ends a step under zero 1;
``install_hooks`` makes a zero-3 program free each weight after the layer that reads it.
``fxpar/ops/params.py`` has the op every program reads the weights through, and why.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..capture import Captured
from ..codegen import get_path
from ..holder import set_path
from ..ops.params import SHARDED, SavedGathers, Sharded, row_split, scatter_rows_many
from .buckets import buckets


def hold_weights(root: nn.Module, cap: Captured, rows: dict[str, int], cast: set[str], level: int,
                 places: dict[str, tuple[int, int, str]], dtype: torch.dtype | None, reduce_dtype: torch.dtype,
                 host: set[str] = frozenset()) -> None:
    """Hold each weight ``root`` has under a name in ``rows`` (graph name -> its rows) as this
    rank's rows of it (``places``: its index among the ranks the weight is split over, their
    number and their group): a view of the whole weight under zero 1 and 2 (which keep it), a copy
    under zero 3 (which frees it); each in ``cast`` (names) as an fp32 master the graph reads in
    ``dtype``; each in ``host`` with its master in host memory (pinned beside a GPU), the device
    keeping the weight as the graph reads it."""
    for target in sorted(set(rows) | set(cast) | set(host)):
        whole = get_path(root, target)
        compute = dtype if target in cast else whole.dtype
        device = whole.device

        def master(t):  # the optimizer's own copy: in host memory when offloaded, pinned beside a GPU
            if target not in host:
                return t.clone()
            t = t.to("cpu", copy=True)
            return t.pin_memory() if device.type == "cuda" else t

        if target not in rows:  # whole on every dp rank: only the dtype or the place differs
            full = whole.detach().to(compute)
            param = nn.Parameter(master(whole.detach()), requires_grad=whole.requires_grad) if target in host else whole
            SHARDED[param] = Sharded(target, 0, param, None, 0, whole.shape[0] if whole.dim() else 0,
                                     full, compute, reduce_dtype, device, target in host)
        else:
            index, world, group = places[target]
            start, stop = row_split(rows[target], world)[index]
            full = whole.detach()
            keep = level < 3
            if keep and (compute != full.dtype or target in host):  # the master rows apart from the whole weight
                mine, full = master(full[start:stop]), full.to(compute)
            else:
                mine = full[start:stop] if keep else master(full[start:stop])
            param = nn.Parameter(mine, requires_grad=whole.requires_grad)
            SHARDED[param] = Sharded(target, level, param, rows[target], start, stop, full if keep else None, compute,
                                     reduce_dtype, device, target in host, group)
        if param is not whole:
            for alias in cap.aliases.get(target, [target]):
                set_path(root, alias, param)


def finish(params, comms: dict) -> None:
    """After a step's last backward under zero 1: each weight's rows get their share of its
    gradient, averaged over the ranks it is split over; one reduce-scatter per bucket of
    gradients over one group (in the same order on every rank)."""
    entries = [e for name in sorted(params) if (e := SHARDED.get(params[name])) is not None
               and e.level == 1 and e.full_grad is not None]
    for group in sorted({e.group for e in entries}):
        _finish([e for e in entries if e.group == group], comms[group])


def _finish(entries: list, comm) -> None:
    for bucket in buckets(entries, lambda e: e.full_grad):
        grads = [e.full_grad.to(e.reduce_dtype) for e in bucket]
        for e, mine in zip(bucket, scatter_rows_many(grads, [e.rows for e in bucket], comm)):
            e.full_grad = None
            p = e.master
            mine = e._to_master(mine)
            p.grad = mine if p.grad is None else p.grad.add_(mine)


def install_hooks(module: nn.Module) -> None:
    """Run ``module``'s forward under ``SavedGathers.hooks()`` (zero 3)."""
    stack: list = []

    def enter(mod, args):
        stack.append(SavedGathers.hooks())
        stack[-1].__enter__()

    def leave(mod, args, out):
        if stack:
            stack.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def is_split(p: torch.Tensor) -> bool:
    """Whether ``p`` is a weight's rows under zero ."""
    entry = SHARDED.get(p)
    return entry is not None and entry.level > 0
