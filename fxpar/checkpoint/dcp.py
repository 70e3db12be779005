"""Sharded checkpoints in ``torch.distributed.checkpoint`` (DCP) format.

Layout of a checkpoint folder (what DCP writes, plus fxpar's manifest):

* ``__<rank>_<n>.distcp`` and ``.metadata``: a DCP checkpoint whose keys are the model's
  original names, ``model.<name>`` for every parameter and persistent buffer (a tied weight under
  each of its names), the optimizer's state under ``optim.`` (``checkpoint/optimizer.py``) and
  every rank's random-number states under ``rng.<rank>.<generator>``. Each tensor is stored as
  the boxes the ranks hold (``layout.pieces_of``), each once, with its offsets in the full
  tensor: DCP reads any other split of it back, which is how a checkpoint saved on one mesh loads
  on another, and how a single-device model loads it with DCP alone.
* ``fxpar.json``: the manifest (``checkpoint/manifest.py``), JSON: the listing of every stored
  box with its CRC-32, the mesh, the user's ``extra``. Loading reads only the manifest and the
  data files, never ``.metadata`` (a pickle), unless the user passes ``trusted=True``.

A save writes into ``<path>.partial`` and renames it to ``<path>`` once every rank has written
and the checksums are recorded, so an interrupted save never leaves a folder that loads as if
complete. A load is all or nothing: everything is read into staging tensors first and copied into
the model and the optimizer only once all of it was read and checked, on every rank.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

from ..errors import CheckpointError, FxparError
from ..mesh import DIM_ORDER
from ..runtime.agree import agree, agree_on_failure, differences
from . import coordination, manifest
from . import optimizer as optim
from .layout import full_names, local_tensors
from .pieces import Pieces, lookup

RNG = "rng."


class _SavePlanner(DefaultSavePlanner):
    """Takes a flat state dict ("model.<name>", "optim.state.<name>.<key>", ...) holding Pieces."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        found = lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class _LoadPlanner(DefaultLoadPlanner):
    """Loads into a flat state dict holding Pieces (which the default set-up, made for tensors
    and DTensors, would drop): loaded tensors land in their views, other values in the dict,
    unpickled with ``weights_only=True`` unless the folder is trusted."""

    def __init__(self, trusted: bool):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.trusted = trusted

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index):
        found = lookup(self.state_dict, index)
        return super().lookup_tensor(index) if found is None else found

    def load_bytes(self, read_item, value) -> None:
        if self.trusted:
            return super().load_bytes(read_item, value)
        try:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised naming the value
            raise CheckpointError(
                f"the stored value '{_user_key(read_item.dest_index.fqn)}' is not plain data that fxpar reads "
                f"without running code ({type(e).__name__}); if you trust this checkpoint, pass trusted=True"
            ) from None


class _Reader(FileSystemReader):
    """Reads one parameter at a time, so that a failure names it, checks every stored box
    against the CRC-32 the save recorded before DCP reads it, and takes DCP's metadata from the
    manifest (``metadata``) instead of unpickling ``.metadata``; ``metadata=None`` (a trusted
    folder) reads ``.metadata`` as DCP does."""

    def __init__(self, path: str, metadata, checksums: dict | None):
        super().__init__(path)
        self._metadata = metadata
        self._checksums = checksums or {}
        self._checked: set = set()

    def read_metadata(self):  # no **kwargs: DCP must not fall back to a per-rank pickle
        md = super().read_metadata() if self._metadata is None else self._metadata
        if self._metadata is not None:
            md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner):
        by_name: dict[str, list] = {}
        for item in plan.items:
            by_name.setdefault(item.dest_index.fqn, []).append(item)
        for fqn, items in by_name.items():
            try:
                for item in items:
                    self._verify(fqn, self.storage_data[item.storage_index])
                super().read_data(LoadPlan(items), planner).wait()
            except FxparError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised naming the tensor
                raise CheckpointError(
                    f"checkpoint '{self.path}': reading '{_user_key(fqn)}' failed: {type(e).__name__}: {e}") from e
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _verify(self, fqn: str, info) -> None:
        key = (info.relative_path, info.offset)
        expect = self._checksums.get(info.relative_path, {}).get(str(info.offset))
        if key in self._checked or (expect is None and self._metadata is None):
            return
        if expect is None or manifest.crc(self.path, info) != expect:
            raise CheckpointError(
                f"checkpoint '{self.path}' is damaged: the stored '{_user_key(fqn)}' (in {info.relative_path} at byte "
                f"{info.offset}) does not match the checksum written when it was saved"
            )
        self._checked.add(key)


def _user_key(fqn: str) -> str:
    """'model.h.0.w' -> 'h.0.w'; 'optim.state.h.0.w.exp_avg' -> 'optimizer state h.0.w.exp_avg'."""
    if fqn.startswith("model."):
        return fqn[len("model."):]
    if fqn.startswith(optim.STATE):
        return "optimizer state " + fqn[len(optim.STATE):]
    return fqn


def _stored(aliases, stored) -> str | None:
    """The key a tensor known by ``aliases`` is stored under (the first of its names there)."""
    return next((f"model.{a}" for a in aliases if f"model.{a}" in stored), None)


def _model_entries(tensors) -> dict:
    return {f"model.{alias}": Pieces(lt.shape, lt.pieces) for lt in tensors for alias in lt.aliases}


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

    def clear():  # a save that did not finish, or one cut between its two renames
        if rank0:
            manifest.recover(path)
            manifest.clear_partial(path)

    agree_on_failure(group, clear, f"to clear what an earlier save to '{path}' left")
    try:
        md = dcp.save(state, storage_writer=FileSystemWriter(tmp), planner=_SavePlanner(),
                      process_group=coordination.process_group(pm.timeout))
    except CheckpointException as e:
        raise CheckpointError(_failure(e, f"saving checkpoint '{path}' failed")) from None
    share = (coordination.rank(), coordination.world())
    sums = agree_on_failure(group, lambda: manifest.checksums(tmp, md, share), f"to check what it wrote to '{tmp}'")
    parts = group.gather_json(sums)

    def commit():
        if rank0:
            merged: dict = {}
            for part in parts:
                merged.update(part)
            manifest.write(tmp, {
                "mesh": _mesh_of(pm), "world": coordination.world(), "device": pm.device.type,
                "optimizer": optimizer is not None, "extra": extra, **manifest.metadata_to_json(md),
                "checksums": merged,
            })
            manifest.commit(tmp, path)

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
def looks_like_checkpoint(path: str) -> bool:
    """A checkpoint folder, whole or not (then ``load`` says what is wrong), or a name whose save
    did not finish."""
    path = path.rstrip("/")
    if path.endswith(manifest.PARTIAL) or os.path.isdir(path + manifest.PARTIAL):
        return True
    if not os.path.isdir(path):
        return False
    files = os.listdir(path)
    return ".metadata" in files or manifest.MANIFEST in files or any(f.endswith(".distcp") for f in files)


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
        doc, md, reader = _open(path, trusted)
        saved = md.state_dict_metadata
        tensors = local_tensors(pm)
        missing, unexpected, error = _compare_model(full_names(pm), saved, path)
        if error or (strict and (missing or unexpected)):
            raise CheckpointError(error or _strict_error(path, missing, unexpected))
        error = _check_files(md, path)
        if error:
            raise CheckpointError(error)
        staged = {}
        for lt in tensors:
            key = _stored(lt.aliases, saved)
            if key is not None:
                local = torch.empty(tuple(lt.tensor.shape), dtype=saved[key].properties.dtype)
                staged[key] = Pieces(lt.shape, pm._pieces(lt.name, local), local)
        if optimizer is not None:
            if doc is not None and not doc.get("optimizer", True):
                raise CheckpointError(
                    f"checkpoint '{path}' was saved without optimizer state; load it without optimizer=...")
            staged.update(optim.staging(pm, optimizer, tensors, saved, path, missing))
        rng, notes = _rng_keys(pm, doc, saved, path) if restore_rng else ({}, [])
        staged.update(rng)
        return doc, reader, tensors, staged, (missing, unexpected), notes

    prepared = agree_on_failure(group, prepare, f"to prepare loading '{path}'")
    doc, reader, tensors, staged, (missing, unexpected), notes = prepared
    try:
        dcp.load(staged, storage_reader=reader, planner=_LoadPlanner(trusted),
                 process_group=coordination.process_group(pm.timeout))
    except CheckpointException as e:  # every rank gets every rank's failure: report the first
        raise CheckpointError(_failure(e, f"loading checkpoint '{path}' failed")) from None

    def ready():  # everything that could still fail, before anything changes
        return optim.state_dict(optimizer, tensors, staged, missing) if optimizer is not None else None

    optimizer_state = agree_on_failure(group, ready, f"to load '{path}'")
    _commit(pm, tensors, staged, optimizer, optimizer_state)
    return missing, unexpected, (doc or {}).get("extra"), notes


def _open(path: str, trusted: bool):
    """``(manifest, DCP metadata, reader)`` of a checkpoint folder; only a trusted folder may
    lack a manifest (its metadata is then DCP's pickle)."""
    if path.endswith(manifest.PARTIAL):
        raise CheckpointError(f"'{path}' is a save that did not finish; it cannot be loaded: load the checkpoint "
                              "saved before it (fxpar.latest_checkpoint finds it)")
    if not os.path.isdir(path):
        if manifest.is_checkpoint(path + manifest.OLD):
            raise CheckpointError(f"no checkpoint at '{path}': a save replacing it was cut short; the previous one is "
                                  f"whole at '{path + manifest.OLD}' (the next fxpar.save to '{path}' puts it back)")
        if os.path.isdir(path + manifest.PARTIAL):
            raise CheckpointError(f"no checkpoint at '{path}': a save to it did not finish "
                                  f"('{path + manifest.PARTIAL}' is what it left); load an earlier checkpoint")
        raise CheckpointError(f"no checkpoint at '{path}': give the folder fxpar.save wrote "
                              "(fxpar.latest_checkpoint(root) finds the newest in a folder of them)")
    doc = manifest.read(path)
    if doc is None or doc.get("format") != manifest.FORMAT:
        if not trusted:
            raise CheckpointError(_untrusted(path, doc))
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: it has no .metadata file "
                                  "(a save cut short, or a damaged copy)")
        reader = _Reader(path, None, (doc or {}).get("checksums"))
        return doc, reader.read_metadata(), reader
    md = manifest.metadata_from_json(doc, path)
    reader = _Reader(path, md, doc.get("checksums"))
    return doc, md, reader


def _untrusted(path: str, doc) -> str:
    why = (f"it has no {manifest.MANIFEST}, so it is not a checkpoint fxpar wrote" if doc is None else
           f"its {manifest.MANIFEST} is of format {doc.get('format')!r} (an earlier fxpar), which lists its tensors "
           "only in .metadata")
    return (
        f"fxpar will not load '{path}': {why}. Its description of the tensors is torch.distributed.checkpoint's "
        ".metadata, a pickle, and reading a pickle runs whatever code its author put in it. fxpar reads only "
        f"checkpoints whose {manifest.MANIFEST} (JSON) lists every tensor and checksum. If you wrote this folder "
        "yourself or trust whoever did, load it with fxpar.load(pm, path, trusted=True)."
    )


def _compare_model(names: dict, saved: dict, path: str):
    """``(missing, unexpected, error)``: the model's tensors the checkpoint lacks, the stored
    tensors the model lacks (both by name, as ``load_state_dict`` reports them), and a shape or
    kind that differs."""
    missing = []
    for name, (aliases, shape, _) in names.items():
        key = _stored(aliases, saved)
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
    unexpected = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k[len("model."):] not in known)
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


def _check_files(md, path: str) -> str | None:
    """Every stored box lies inside its file: a save cut short or a truncated copy fails here."""
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        file = os.path.join(path, info.relative_path)
        if info.relative_path not in sizes:
            if os.path.islink(file):  # a checkpoint's data files are its own, never links elsewhere
                return (f"checkpoint '{path}' is not one fxpar wrote: its data file {info.relative_path} is a link; "
                        "copy the checkpoint with its files (cp -rL) and load the copy")
            sizes[info.relative_path] = os.path.getsize(file) if os.path.isfile(file) else -1
        have = sizes[info.relative_path]
        if have < 0:
            return (f"checkpoint '{path}' is incomplete: {info.relative_path}, which holds "
                    f"'{_user_key(index.fqn)}', is missing")
        if have < info.offset + info.length:
            return (f"checkpoint '{path}' is truncated: '{_user_key(index.fqn)}' is stored at bytes "
                    f"{info.offset}..{info.offset + info.length} of {info.relative_path}, which has {have} bytes")
    return None


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
        key = _stored(lt.aliases, staged)
        if key is not None:
            lt.tensor.copy_(staged[key].local)
    prefix = f"{RNG}{coordination.rank()}."
    rng = {k[len(prefix):]: v for k, v in staged.items() if k.startswith(prefix)}
    if rng:
        pm.set_rng_state(rng)


def _failure(e: CheckpointException, what: str) -> str:
    """The message of the first rank's failure (ours say which tensor; others get it prefixed)."""
    rank, (exc, _) = min(e.failures.items(), key=lambda kv: (not isinstance(kv[1][0], FxparError), kv[0]))
    if isinstance(exc, FxparError):
        return str(exc)
    return f"{what} on rank {rank}: {type(exc).__name__}: {exc}"
