"""Sharded checkpoints in ``torch.distributed.checkpoint`` (DCP) format.

Layout of a checkpoint folder (what DCP writes, plus one file of fxpar's):

* ``.metadata`` and ``__<rank>_<n>.distcp``: a DCP checkpoint whose keys are the model's
  original names, ``model.<name>`` for every parameter and persistent buffer (a tied weight under
  each of its names) and, when an optimizer was given, ``optim.state.<name>.<key>`` and
  ``optim.param_groups.<name>.<key>``: the flattened form of
  ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``. Each tensor is stored as
  the boxes the ranks hold (``layout.pieces_of``), each once, with its offsets in the full
  tensor: DCP reads any other split of it back, which is how a checkpoint saved on one mesh loads
  on another, and how a single-device model loads it with DCP alone.
* ``fxpar.json``: the mesh it was saved on and a CRC-32 of every stored box, checked on load.

A save writes into ``<path>.partial`` and renames it to ``<path>`` once every rank has written
and the checksums are recorded, so an interrupted save never leaves a folder that loads as if
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, TensorWriteData, WriteItem, WriteItemType

from ..errors import FxparError
from ..mesh import DIM_ORDER
from .layout import full_names, local_tensors

MANIFEST = "fxpar.json"
PARTIAL = ".partial"
FORMAT = 1


class Pieces:
    """A tensor as the boxes this rank holds of it, in the form DCP saves and loads
    (the ``_Checkpointable`` protocol DTensor implements)."""

    def __init__(self, shape, pieces):
        self.shape = torch.Size(shape)
        self.pieces = pieces

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn, obj):
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=view.size()),
                    properties=TensorProperties.create_from_tensor(view),
                    size=self.shape,
                ),
            )
            for offsets, view in self.pieces
        ]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=v.size()) for o, v in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, view in self.pieces:
            if torch.Size(offsets) == index.offset:
                return view
        raise FxparError(f"no piece of '{index.fqn}' at offsets {tuple(index.offset)} on this rank")


def _lookup(state_dict, index):
    obj = state_dict[index.fqn]
    if isinstance(obj, Pieces):
        return obj.__get_tensor_shard__(index)
    return None


class _SavePlanner(DefaultSavePlanner):
    """Takes a flat state dict ("model.<name>", "optim.state.<name>.<key>", ...) holding Pieces."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        found = _lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class _LoadPlanner(DefaultLoadPlanner):
    """Loads into a flat state dict holding Pieces (which the default set-up, made for tensors
    and DTensors, would drop): loaded tensors land in their views, other values in the dict."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index):
        found = _lookup(self.state_dict, index)
        return super().lookup_tensor(index) if found is None else found


class _Reader(FileSystemReader):
    """Reads one parameter at a time, so that a failure names it, and checks every stored box
    against the CRC-32 the save recorded."""

    def __init__(self, path: str, checksums: dict | None):
        super().__init__(path)
        self._checksums = checksums or {}
        self._checked: set = set()

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
                raise FxparError(f"checkpoint '{self.path}': reading '{_user_key(fqn)}' failed: {type(e).__name__}: {e}") from e
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _verify(self, fqn: str, info) -> None:
        key = (info.relative_path, info.offset)
        expect = self._checksums.get(info.relative_path, {}).get(str(info.offset))
        if expect is None or key in self._checked:
            return
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length or zlib.crc32(data) != expect:
            raise FxparError(
                f"checkpoint '{self.path}' is damaged: the stored '{_user_key(fqn)}' (in {info.relative_path} at byte "
                f"{info.offset}) does not match the checksum written when it was saved"
            )
        self._checked.add(key)


def _user_key(fqn: str) -> str:
    """'model.h.0.w' -> 'h.0.w'; 'optim.state.h.0.w.exp_avg' -> 'optimizer state h.0.w.exp_avg'."""
    if fqn.startswith("model."):
        return fqn[len("model."):]
    if fqn.startswith("optim.state."):
        return "optimizer state " + fqn[len("optim.state."):]
    return fqn


# collectives over the default group (a no-op in one process) ----------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank found an error (a rank that raised alone would leave the
    others waiting in the next collective)."""
    errors = [e for e in _gather(error) if e]
    if errors:
        raise FxparError(errors[0])


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# state dicts -------------------------------------------------------------------------------------
def _model_entries(tensors) -> dict:
    return {f"model.{alias}": Pieces(lt.shape, lt.pieces) for lt in tensors for alias in lt.aliases}


def _optimizer_entries(pm, optimizer, tensors) -> dict:
    """The flattened ``get_optimizer_state_dict`` form, over this rank's shards."""
    by_param = {id(lt.tensor): lt for lt in tensors if lt.is_param}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lt = by_param.get(id(p))
            if lt is None:
                raise FxparError("the optimizer steps a tensor that is not a parameter of this ParallelModule")
            for k, v in group.items():
                if k != "params":
                    out[f"optim.param_groups.{lt.name}.{k}"] = v
            for k, v in optimizer.state.get(p, {}).items():
                key = f"optim.state.{lt.name}.{k}"
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    if v.shape != p.shape:
                        raise FxparError(
                            f"optimizer state '{k}' of '{lt.name}' has shape {tuple(v.shape)}, not its parameter's "
                            f"{tuple(p.shape)}: fxpar checkpoints states shaped like their parameters (Adam, SGD, ...)"
                        )
                    out[key] = Pieces(lt.shape, pm._pieces(lt.name, v))
                else:
                    out[key] = v
    return out


@torch.no_grad()
def _init_optimizer_state(optimizer) -> None:
    """Make every state tensor exist (a step with zero gradients and a learning rate of 0), so
    that loading has somewhere to write: what ``torch.distributed.checkpoint.state_dict`` does."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g


# save --------------------------------------------------------------------------------------------
def save(pm, path: str, optimizer=None) -> None:
    """Write ``pm``'s parameters and buffers (and ``optimizer``'s state) to the folder ``path``.

    A collective: call it on every rank with the same ``path`` (a folder every rank can reach).
    It replaces a previous checkpoint at ``path`` only once the new one is complete.

    >>> fxpar.save(pm, "ckpt/step_1000", optimizer=opt)     # doctest: +SKIP
    """
    path = os.fspath(path).rstrip("/")
    tmp = path + PARTIAL
    tensors = local_tensors(pm)
    state = _model_entries(tensors)
    if optimizer is not None:
        state.update(_optimizer_entries(pm, optimizer, tensors))
    if _rank() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a save that did not finish
    _barrier()
    try:
        dcp.save(state, storage_writer=FileSystemWriter(tmp), planner=_SavePlanner())
    except CheckpointException as e:
        raise FxparError(_failure(e, f"saving checkpoint '{path}' failed")) from None
    checksums = _checksum_share(tmp)
    parts = _gather(checksums)
    if _rank() == 0:
        merged: dict = {}
        for part in parts:
            merged.update(part)
        manifest = {"format": FORMAT, "mesh": {d: getattr(pm.mesh, d) for d in DIM_ORDER},
                    "optimizer": optimizer is not None, "checksums": merged}
        _write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest))
        _commit(tmp, path)
    _barrier()


def _checksum_share(folder: str) -> dict:
    """CRC-32 of every stored box in this rank's share of the data files (split by file)."""
    md = FileSystemReader(folder).read_metadata()
    files = sorted({info.relative_path for info in md.storage_data.values()})
    world = dist.get_world_size() if _distributed() else 1
    mine = set(files[_rank()::world])
    out: dict = {}
    for info in md.storage_data.values():
        if info.relative_path in mine:
            with open(os.path.join(folder, info.relative_path), "rb") as f:
                f.seek(info.offset)
                out.setdefault(info.relative_path, {})[str(info.offset)] = zlib.crc32(f.read(info.length))
    return out


def _write_synced(file: str, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: str, path: str) -> None:
    old = path + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


# load --------------------------------------------------------------------------------------------
def looks_like_checkpoint(path: str) -> bool:
    """A checkpoint folder, whole or not (then ``load`` says what is wrong), or a name whose save
    did not finish."""
    path = path.rstrip("/")
    if path.endswith(PARTIAL) or os.path.isdir(path + PARTIAL):
        return True
    if not os.path.isdir(path):
        return False
    files = os.listdir(path)
    return ".metadata" in files or MANIFEST in files or any(f.endswith(".distcp") for f in files)


def load(pm, path: str, optimizer=None, *, strict: bool = True) -> None:
    """Fill ``pm``'s shards (and ``optimizer``'s state) from the checkpoint folder ``path``, on
    whatever mesh it was saved. A collective: call it on every rank."""
    path = os.fspath(path).rstrip("/")
    if path.endswith(PARTIAL):
        raise FxparError(f"'{path}' is a save that did not finish; it cannot be loaded")
    manifest = _manifest(path)
    reader = _Reader(path, manifest.get("checksums"))
    md = reader.read_metadata()
    saved = md.state_dict_metadata
    tensors = local_tensors(pm)
    _agree(_check_model(full_names(pm), saved, path, strict) or _check_files(md, path))
    state = {}
    for lt in tensors:
        key = next((f"model.{a}" for a in lt.aliases if f"model.{a}" in saved), None)
        if key is not None:
            state[key] = Pieces(lt.shape, lt.pieces)
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        optim = _optimizer_entries(pm, optimizer, tensors)
        _agree(_check_optimizer(optim, saved, path, manifest))
        state.update(optim)
    try:
        dcp.load(state, storage_reader=reader, planner=_LoadPlanner())
    except CheckpointException as e:  # every rank gets every rank's failure: report the first
        raise FxparError(_failure(e, f"loading checkpoint '{path}' failed")) from None
    if optimizer is not None:
        _apply_optimizer(optimizer, state, {id(lt.tensor): lt.name for lt in tensors if lt.is_param})


def _manifest(path: str) -> dict:
    if not os.path.isdir(path):
        if os.path.isdir(path + PARTIAL):
            raise FxparError(f"no checkpoint at '{path}': a save to it did not finish ('{path + PARTIAL}' is what it left)")
        raise FxparError(f"no checkpoint at '{path}'")
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FxparError(f"checkpoint '{path}' is incomplete: it has no .metadata file (a save cut short, or a damaged copy)")
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return {}  # a DCP checkpoint written by something else: nothing more to check
    try:
        with open(file) as f:
            return json.load(f)
    except ValueError as e:
        raise FxparError(f"checkpoint '{path}' is damaged: {MANIFEST} is not readable ({e})") from e


def _check_model(names: dict, saved: dict, path: str, strict: bool) -> str | None:
    missing = []
    for name, (aliases, shape, _) in names.items():
        key = next((f"model.{a}" for a in aliases if f"model.{a}" in saved), None)
        if key is None:
            missing.append(name)
            continue
        md = saved[key]
        if not isinstance(md, TensorStorageMetadata):
            return f"checkpoint '{path}' stores '{name}' as an object, not a tensor"
        if tuple(md.size) != tuple(shape):
            return (f"checkpoint '{path}' holds '{name}' with shape {tuple(md.size)}, but the model's is {tuple(shape)}: "
                    "it was saved from a different configuration")
    if missing and strict:
        return (f"checkpoint '{path}' lacks {len(missing)} tensors of the model: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''} (pass strict=False to load the rest)")
    return None


def _check_files(md, path: str) -> str | None:
    """Every stored box lies inside its file: a save cut short or a truncated copy fails here."""
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        file = os.path.join(path, info.relative_path)
        if info.relative_path not in sizes:
            sizes[info.relative_path] = os.path.getsize(file) if os.path.exists(file) else -1
        have = sizes[info.relative_path]
        if have < 0:
            return f"checkpoint '{path}' is incomplete: {info.relative_path}, which holds '{_user_key(index.fqn)}', is missing"
        if have < info.offset + info.length:
            return (f"checkpoint '{path}' is truncated: '{_user_key(index.fqn)}' is stored at bytes "
                    f"{info.offset}..{info.offset + info.length} of {info.relative_path}, which has {have} bytes")
    return None


def _check_optimizer(entries: dict, saved: dict, path: str, manifest: dict) -> str | None:
    if manifest and not manifest.get("optimizer", True):
        return f"checkpoint '{path}' was saved without optimizer state; load it without optimizer=..."
    for key, value in entries.items():
        if key.startswith("optim.state.") and key not in saved:
            return (f"checkpoint '{path}' has no optimizer state '{key[len('optim.state.'):]}': it was saved without "
                    "optimizer=... or with another optimizer")
        if isinstance(value, Pieces) and tuple(saved[key].size) != tuple(value.shape):
            return f"checkpoint '{path}' holds optimizer state '{key}' with another shape than the model's"
    return None


def _apply_optimizer(optimizer, entries: dict, names: dict) -> None:
    """Hyperparameters and non-tensor states come back as values; put them in place."""
    for group in optimizer.param_groups:
        for k in list(group):
            if k == "params":
                continue
            values = {_hashable(entries.get(f"optim.param_groups.{names[id(p)]}.{k}", group[k])) for p in group["params"]}
            if len(values) > 1:
                raise FxparError(f"the checkpoint gives the parameters of one optimizer group different '{k}'")
            if group["params"]:
                value = entries.get(f"optim.param_groups.{names[id(group['params'][0])]}.{k}", group[k])
                if isinstance(group[k], torch.Tensor) and isinstance(value, torch.Tensor):
                    group[k].copy_(value)
                else:
                    group[k] = value
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                stored = entries.get(f"optim.state.{names[id(p)]}.{k}")
                if not isinstance(v, torch.Tensor) and stored is not None:
                    optimizer.state[p][k] = stored


def _hashable(v):
    if isinstance(v, torch.Tensor):
        return tuple(v.flatten().tolist())
    if isinstance(v, list):
        return tuple(v)
    return v


def _failure(e: CheckpointException, what: str) -> str:
    """The message of the first rank's failure (ours say which tensor; others get it prefixed)."""
    rank, (exc, _) = min(e.failures.items(), key=lambda kv: (not isinstance(kv[1][0], FxparError), kv[0]))
    if isinstance(exc, FxparError):
        return str(exc)
    return f"{what} on rank {rank}: {type(exc).__name__}: {exc}"

