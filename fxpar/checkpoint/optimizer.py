"""An optimizer's state in a checkpoint, under the model's parameter names.

Stored in the flattened form of ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``:
``optim.state.<param>.<key>`` for every state (``exp_avg``, ``step``, ...; a state shaped like its
parameter is stored as the boxes the ranks hold, so it reshards like the parameter) and
``optim.param_groups.<param>.<key>`` for every hyperparameter. Loading makes the optimizer's
state exactly the stored one: a parameter the checkpoint has no state for (saved before the first
step) gets none, and the state goes in through ``optimizer.load_state_dict``, so that every
optimizer's own rules (``step`` kept on the CPU, states cast to the parameter's device) apply.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import CheckpointError
from .keys import GROUPS, STATE
from .layout import laid_out
from .pieces import Pieces

# keys of a param group that list its parameters rather than set them: not stored per parameter
# (``param_names`` is what an optimizer made from ``named_parameters()`` keeps; it is this mesh's)
LISTS = ("params", "param_names")
SMALL = 1 << 16  # elements a hyperparameter or a state not shaped like its parameter may have


def _by_param(optimizer, tensors) -> list[tuple[dict, torch.Tensor, object]]:
    """``(group, parameter, its LocalTensor)`` for every parameter the optimizer steps."""
    by_id = {id(lt.tensor): lt for lt in tensors if lt.is_param}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            lt = by_id.get(id(p))
            if lt is None:
                raise CheckpointError("the optimizer steps a tensor that is not a parameter of this ParallelModule: "
                                      "make it from pm.parameters() (after the first call)")
            out.append((group, p, lt))
    return out


def entries(pm, optimizer, tensors) -> dict:
    """What ``save`` stores of ``optimizer``, over this rank's shards."""
    out = {}
    for group, p, lt in _by_param(optimizer, tensors):
        for k, v in group.items():
            if k not in LISTS:
                out[f"{GROUPS}{lt.name}.{k}"] = v
        for k, v in optimizer.state.get(p, {}).items():
            key = f"{STATE}{lt.name}.{k}"
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.shape != p.shape:
                    raise CheckpointError(
                        f"optimizer state '{k}' of '{lt.name}' has shape {tuple(v.shape)}, not its parameter's "
                        f"{tuple(p.shape)}: fxpar checkpoints states shaped like their parameters (Adam, SGD, ...)"
                    )
                out[key] = laid_out(pm, lt, v)
            else:
                out[key] = v
    return out


def staging(pm, optimizer, tensors, doc: dict | None, saved: dict, path: str, missing=()) -> dict:
    """Places to load the stored state of ``optimizer`` into, made from the checkpoint's own
    listing (``saved``; ``doc`` its manifest): nothing of the optimizer is touched until the whole
    load succeeded. Parameters in ``missing`` (not in the checkpoint, loaded with ``strict=False``)
    keep theirs."""
    if doc is not None and not doc.get("optimizer", True):
        raise CheckpointError(f"checkpoint '{path}' was saved without optimizer state; load it without optimizer=...")
    out = {}
    for group, p, lt in _by_param(optimizer, tensors):
        if lt.name in missing:
            continue
        if f"{GROUPS}{lt.name}.lr" not in saved:
            raise CheckpointError(
                f"checkpoint '{path}' has no optimizer hyperparameters for '{lt.name}': it was saved without this "
                "parameter in its optimizer, or from another model; load it without optimizer=..., or give the "
                "optimizer the parameters it was saved with")
        for k in group:
            key = f"{GROUPS}{lt.name}.{k}"
            if k not in LISTS and key in saved:
                out[key] = _place(saved[key], None)
        prefix = f"{STATE}{lt.name}."
        for key, md in saved.items():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                if isinstance(md, TensorStorageMetadata) and len(md.size) and tuple(md.size) != tuple(lt.shape):
                    raise CheckpointError(
                        f"checkpoint '{path}' holds optimizer state '{key[len(STATE):]}' of shape {tuple(md.size)}, "
                        f"but the parameter's is {tuple(lt.shape)}")
                out[key] = _place(md, (pm, lt, p))
    return out


def _place(md, param):
    """Where one stored value loads: a tensor of its dtype (as this rank's boxes of it when it
    is shaped like the parameter), or None for a value DCP stored as bytes."""
    if not isinstance(md, TensorStorageMetadata):
        return None
    dtype = md.properties.dtype
    if not len(md.size) or param is None:
        if md.size.numel() > SMALL:  # sizes come from the folder: never allocate what it says blindly
            raise CheckpointError(f"a stored hyperparameter or state of size {tuple(md.size)} is not one an optimizer "
                                  "keeps: the checkpoint is damaged or was not written by fxpar.save")
        return torch.empty(tuple(md.size), dtype=dtype)
    pm, lt, p = param
    return laid_out(pm, lt, torch.empty(tuple(p.shape), dtype=dtype))


def state_dict(optimizer, tensors, staged: dict, missing=()) -> dict:
    """The loaded state in ``optimizer.state_dict()`` form (parameters by position); the
    parameters in ``missing`` keep the state they have."""
    out: dict = {"state": {}, "param_groups": []}
    index = 0
    names = {id(lt.tensor): lt.name for lt in tensors if lt.is_param}
    for group in optimizer.param_groups:
        loaded = {k: v for k, v in group.items() if k != "params"}
        for k in [k for k in loaded if k not in LISTS]:
            values = [_value(staged[f"{GROUPS}{names[id(p)]}.{k}"]) for p in group["params"]
                      if f"{GROUPS}{names[id(p)]}.{k}" in staged]
            if values and any(not _same(v, values[0]) for v in values[1:]):
                raise CheckpointError(
                    f"the checkpoint gives the parameters of one optimizer group different '{k}': group the "
                    "optimizer's parameters as they were grouped when it was saved")
            if values:
                loaded[k] = values[0]
        ids = []
        for p in group["params"]:
            prefix = f"{STATE}{names[id(p)]}."
            if names[id(p)] in missing:
                state = dict(optimizer.state.get(p, {}))
            else:
                state = {key[len(prefix):]: _value(v) for key, v in staged.items()
                         if key.startswith(prefix) and "." not in key[len(prefix):]}
            if state:
                out["state"][index] = state
            ids.append(index)
            index += 1
        out["param_groups"].append({**loaded, "params": ids})
    return out


def _value(v):
    return v.local if isinstance(v, Pieces) else v


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b
