"""Sharded checkpoints in ``torch.distributed.checkpoint`` (DCP) format: ``save`` and ``load``,
the steps every rank takes together.

Layout of a checkpoint folder (what DCP writes, plus fxpar's manifest):

* ``__<rank>_<n>.distcp`` and ``.metadata``: a DCP checkpoint whose keys are the model's
  original names (``checkpoint/keys.py``), ``model.<name>`` for every parameter and persistent
  buffer (a tied weight under each of its names), the optimizer's state under ``optim.``
  (``checkpoint/optimizer.py``) and every rank's random-number states under
  ``rng.<rank>.<generator>``. Each tensor is stored as the boxes the ranks hold
  (``ShardGeometry.pieces``), each once, with its offsets in the full tensor: DCP reads any other
  split of it back, which is how a checkpoint saved on one mesh loads on another, and how a
  single-device model loads it with DCP alone (through ``checkpoint/adapter.py``).
* ``fxpar.json``: the manifest (``checkpoint/manifest.py``), JSON: the listing of every stored
  box with its CRC-32, the mesh, the user's ``extra``. Loading reads only the manifest and the
  data files, never ``.metadata`` (a pickle), unless the user passes ``trusted=True``.

A save writes into ``<path>.partial`` and renames it to ``<path>`` once every rank has written
and the checksums are recorded, so an interrupted save never leaves a folder that loads as if
complete (``checkpoint/manifest.py``). A load is all or nothing: everything is read into staging
tensors first and copied into the model and the optimizer only once all of it was read and
checked, on every rank.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import CheckpointError
from ..mesh import DIM_ORDER
from ..runtime.agree import agree, agree_on_failure, differences
from . import adapter, coordination, manifest
from . import optimizer as optim
from .keys import MODEL, RNG, stored
from .layout import laid_out, local_tensors
from .manifest import looks_like_checkpoint  # noqa: F401 - fxpar.checkpoint asks dcp whether a path is one
from .pieces import Pieces


def _model_entries(tensors) -> dict:
    return {f"{MODEL}{alias}": Pieces(lt.shape, lt.pieces) for lt in tensors for alias in lt.aliases}


def _mesh_of(pm) -> dict:
    return {d: getattr(pm.mesh, d) for d in DIM_ORDER}


# save --------------------------------------------------------------------------------------------
def save(pm, path: str, optimizer=None, *, extra: dict | None = None) -> None:
    """Write ``pm``'s parameters and buffers (and ``optimizer``'s state, every rank's random
    states and ``extra``) to the folder ``path``.

    A collective: call it on every rank with the same ``path`` (a folder every rank can reach).
    It replaces a previous checkpoint at ``path`` only once the new one is complete, and refuses a
    path that is a file or a folder of something else before touching anything.

    >>> fxpar.save(pm, "ckpt/step_1000", optimizer=opt, extra={"step": 1000})     # doctest: +SKIP
    """
    path = os.fspath(path).rstrip("/")
    with coordination.failures_as_collective_errors(f"saving checkpoint '{path}'", pm.timeout):
        _save(pm, path, optimizer, extra)


def _save(pm, path: str, optimizer, extra) -> None:
    group = coordination.group(pm.timeout)
    agree(group, {"path": path, "optimizer": optimizer is not None}, _explain_call("fxpar.save"))

    def prepare():
        if extra is not None:
            _check_extra(extra)
        manifest.check_target(path)
        tensors = local_tensors(pm)
        state = _model_entries(tensors)
        if optimizer is not None:
            state.update(optim.entries(pm, optimizer, tensors))
        state.update({f"{RNG}{coordination.rank()}.{k}": v for k, v in pm.rng_state().items()})
        return state

    state = agree_on_failure(group, prepare, f"to prepare saving '{path}'")
    tmp = path + manifest.PARTIAL
    rank0 = coordination.rank() == 0

    agree_on_failure(group, lambda: manifest.clear(path) if rank0 else None,
                     f"to clear what an earlier save to '{path}' left")
    try:
        md = dcp.save(state, storage_writer=FileSystemWriter(tmp), planner=adapter.SavePlanner(),
                      process_group=coordination.process_group(pm.timeout))
    except CheckpointException as e:
        raise CheckpointError(adapter.failure(e, f"saving checkpoint '{path}' failed")) from None
    share = (coordination.rank(), coordination.world())
    sums = agree_on_failure(group, lambda: manifest.checksums(tmp, md, share), f"to check what it wrote to '{tmp}'")
    parts = group.gather_json(sums)

    def commit():
        if rank0:
            doc = {"mesh": _mesh_of(pm), "world": coordination.world(), "device": pm.device.type,
                   "optimizer": optimizer is not None, "extra": extra}
            manifest.finish(tmp, path, md, parts, doc)

    agree_on_failure(group, commit, f"to commit '{path}'")  # returns once the checkpoint is in place


def _check_extra(extra) -> None:
    if not isinstance(extra, dict):
        raise CheckpointError(f"extra= takes a dict (e.g. {{'step': 100}}), not {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"extra= is stored as JSON and must hold only what JSON can (numbers, strings, lists, "
                              f"dicts): {e}") from None


def _explain_call(what: str):
    def explain(summaries, ranks):
        return (f"the ranks called {what} differently:\n  " + "\n  ".join(differences(summaries, ranks))
                + f"\n{what} is a collective: call it on every rank with the same path and options")
    return explain


# load --------------------------------------------------------------------------------------------
def load(pm, path: str, optimizer=None, *, strict: bool = True, trusted: bool = False, restore_rng: bool = True):
    """Fill ``pm``'s shards (and ``optimizer``'s state) from the checkpoint folder ``path``, on
    whatever mesh it was saved; ``(missing, unexpected, extra, notes)``, notes being what the
    caller should warn about. A collective: call it on every rank. On any error, on any rank, the
    model and the optimizer are left as they were."""
    path = os.fspath(path).rstrip("/")
    with coordination.failures_as_collective_errors(f"loading checkpoint '{path}'", pm.timeout):
        return _load(pm, path, optimizer, strict, trusted, restore_rng)


def _load(pm, path: str, optimizer, strict: bool, trusted: bool, restore_rng: bool):
    group = coordination.group(pm.timeout)
    agree(group, {"path": path, "optimizer": optimizer is not None, "strict": strict, "trusted": trusted},
          _explain_call("fxpar.load"))

    def prepare():
        doc, md = manifest.open_folder(path, trusted)
        md, reader = adapter.reader(path, doc, md)
        saved = md.state_dict_metadata
        tensors = local_tensors(pm)
        missing, unexpected, error = _compare_model(pm.geometry.full_names(), saved, path)
        if error or (strict and (missing or unexpected)):
            raise CheckpointError(error or _strict_error(path, missing, unexpected))
        error = manifest.check_files(md, path)
        if error:
            raise CheckpointError(error)
        staged = {}
        for lt in tensors:
            key = stored(lt.aliases, saved)
            if key is not None:
                staged[key] = laid_out(pm, lt, torch.empty(tuple(lt.tensor.shape), dtype=saved[key].properties.dtype))
        if optimizer is not None:
            staged.update(optim.staging(pm, optimizer, tensors, doc, saved, path, missing))
        rng, notes = _rng_keys(pm, doc, saved, path) if restore_rng else ({}, [])
        staged.update(rng)
        return doc, reader, tensors, staged, (missing, unexpected), notes

    prepared = agree_on_failure(group, prepare, f"to prepare loading '{path}'")
    doc, reader, tensors, staged, (missing, unexpected), notes = prepared
    try:
        dcp.load(staged, storage_reader=reader, planner=adapter.LoadPlanner(trusted),
                 process_group=coordination.process_group(pm.timeout))
    except CheckpointException as e:  # every rank gets every rank's failure: report the first
        raise CheckpointError(adapter.failure(e, f"loading checkpoint '{path}' failed")) from None

    def ready():  # everything that could still fail, before anything changes
        return optim.state_dict(optimizer, tensors, staged, missing) if optimizer is not None else None

    optimizer_state = agree_on_failure(group, ready, f"to load '{path}'")
    _commit(pm, tensors, staged, optimizer, optimizer_state)
    return missing, unexpected, (doc or {}).get("extra"), notes


def _compare_model(names: dict, saved: dict, path: str):
    """``(missing, unexpected, error)``: the model's tensors the checkpoint lacks, the stored
    tensors the model lacks (both by name, as ``load_state_dict`` reports them), and a shape or
    kind that differs."""
    missing = []
    for name, (aliases, shape, _) in names.items():
        key = stored(aliases, saved)
        if key is None:
            missing.append(name)
            continue
        md = saved[key]
        if not isinstance(md, TensorStorageMetadata):
            return [], [], f"checkpoint '{path}' stores '{name}' as an object, not a tensor"
        if tuple(md.size) != tuple(shape):
            return [], [], (f"checkpoint '{path}' holds '{name}' with shape {tuple(md.size)}, but the model's is "
                            f"{tuple(shape)}: it was saved from a different configuration")
    known = {a for aliases, _, _ in names.values() for a in aliases}
    unexpected = sorted(k[len(MODEL):] for k in saved if k.startswith(MODEL) and k[len(MODEL):] not in known)
    return sorted(missing), unexpected, None


def _strict_error(path: str, missing: list, unexpected: list) -> str:
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} tensors of the model: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"holds {len(unexpected)} tensors the model lacks: {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}")
    return (f"checkpoint '{path}' " + " and ".join(parts)
            + " (pass strict=False to load what matches and get the rest reported)")


def _rng_keys(pm, doc, saved: dict, path: str) -> tuple[dict, list[str]]:
    """Staging for this rank's random states, and notes for the user: states are restored only
    where the checkpoint was saved on this mesh, with generators of the same kinds (a rank's
    states mean nothing to another rank's position, a CPU generator's nothing to a GPU's)."""
    mine = f"{RNG}{coordination.rank()}."
    keys = {k[len(mine):]: (k, md) for k, md in saved.items() if k.startswith(mine)}
    if not keys:
        return {}, []
    current = pm.rng_state()
    where = doc.get("mesh") if doc else None
    if doc is None or where != _mesh_of(pm) or doc.get("world") != coordination.world():
        return {}, [f"'{path}' was saved on {where or 'another mesh'}; random states are per rank, so they are not "
                    f"restored on {pm.mesh}"]
    same = set(keys) == set(current) and doc.get("device") in (None, pm.device.type) and all(
        isinstance(md, TensorStorageMetadata) and tuple(md.size) == tuple(current[name].shape)
        and md.properties.dtype == current[name].dtype for name, (_, md) in keys.items())
    if not same:
        return {}, [f"the random states in '{path}' are of other generators than this run's "
                    f"({doc.get('device')} against {pm.device.type}); they are not restored"]
    return {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in keys.values()}, []


@torch.no_grad()
def _commit(pm, tensors, staged: dict, optimizer, optimizer_state) -> None:
    """Put what was loaded in place (nothing here can fail on a well-formed load)."""
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    for lt in tensors:
        key = stored(lt.aliases, staged)
        if key is not None:
            lt.tensor.copy_(staged[key].local)
    prefix = f"{RNG}{coordination.rank()}."
    rng = {k[len(prefix):]: v for k, v in staged.items() if k.startswith(prefix)}
    if rng:
        pm.set_rng_state(rng)
