"""A rank's weights as ``zero`` holds them: rows of each weight over the data-parallel ranks.

``split_rows`` turns the whole (tp-local) weights ``populate`` registered into the rows this dp
rank holds, registered under every original name in their place, so that ``pm.parameters()``,
``state_dict()``, optimizers and checkpoints see the rows; ``finish`` ends a step under zero 1;
``install_hooks`` makes a zero-3 program free each weight after the layer that reads it.
``fxpar/ops/params.py`` has the op every program reads the weights through, and why.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..capture import Captured
from ..codegen import get_path
from ..holder import set_path
from ..ops.params import SHARDED, SavedGathers, Sharded, row_split


def split_rows(root: nn.Module, cap: Captured, rows: dict[str, int], level: int, dp_rank: int, dp: int) -> None:
    """Replace each weight ``root`` holds under a name in ``rows`` (graph name -> its rows) by
    this dp rank's rows of it: a view of the whole weight under zero 1 and 2 (which keep it), a
    copy under zero 3 (which frees it)."""
    for target in sorted(rows):
        whole = get_path(root, target)
        start, stop = row_split(rows[target], dp)[dp_rank]
        full = whole.detach()
        mine = full[start:stop] if level < 3 else full[start:stop].clone()
        param = nn.Parameter(mine, requires_grad=whole.requires_grad)
        SHARDED[param] = Sharded(target, level, param, rows[target], start, stop, full if level < 3 else None)
        for alias in cap.aliases.get(target, [target]):
            set_path(root, alias, param)


def finish(params, comm) -> None:
    """After a step's last backward under zero 1: each weight's rows get their share of its
    gradient, averaged over the dp ranks (in the same order on every rank)."""
    for name in sorted(params):
        entry = SHARDED.get(params[name])
        if entry is not None and entry.level == 1:
            entry.finish(comm)


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
    """Whether ``p`` is a weight's rows under zero."""
    return p in SHARDED
