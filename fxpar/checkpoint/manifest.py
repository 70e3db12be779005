"""``fxpar.json``: the one file of a checkpoint folder fxpar reads before any other, and the only
description of the folder it trusts.

``torch.distributed.checkpoint`` describes a checkpoint in ``.metadata``, a pickle: reading it
runs whatever code its author put in it. A checkpoint folder is something users download and
copy around, so fxpar never reads ``.metadata`` (nor any other pickle) from a folder unless the
user says the folder is trusted. Instead the manifest, plain JSON that fxpar writes last when it
saves, lists every stored tensor (dtype, full size, the boxes stored), where each box lies (file,
byte offset, length) and the CRC-32 of each box's bytes. Loading builds DCP's metadata from the
manifest, checks each box's bytes against its CRC before DCP reads them, reads tensors with
``torch.load(weights_only=True)`` and hyperparameters likewise: nothing in the folder can run.

The manifest also records the mesh the checkpoint was saved on, whether it holds optimizer
state, each rank's random-number states (``rng``) and the user's ``extra`` payload (a training
step, a data position).

The folder's life is here too: a save writes into ``<path>.partial`` and, once every rank has
written and the checksums are in the manifest, renames it to ``<path>`` (``commit``), so an
interrupted save never leaves a folder that loads as if complete (``recover`` and
``clear_partial`` tidy what one left); a load opens the folder (``open_folder``) and checks every
stored box lies inside its file (``check_files``) before DCP reads anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)

from ..errors import CheckpointError
from .keys import user_key

MANIFEST = "fxpar.json"
PARTIAL = ".partial"
OLD = ".old"
FORMAT = 2
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")  # the only files a manifest may point at
_OWN_FILES = re.compile(r"\.metadata|__\d+_\d+\.distcp|fxpar\.json")


def metadata_to_json(md: Metadata) -> dict:
    """DCP's metadata as plain values."""
    tensors = {}
    for fqn, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            tensors[fqn] = {
                "dtype": str(entry.properties.dtype).replace("torch.", ""),
                "size": list(entry.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in entry.chunks],
            }
        else:
            tensors[fqn] = {"bytes": True}
    storage = [
        {"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset), "index": index.index,
         "file": info.relative_path, "at": info.offset, "length": info.length}
        for index, info in md.storage_data.items()
    ]
    return {"tensors": tensors, "storage": storage, "version": md.version}


def metadata_from_json(doc: dict, path: str) -> Metadata:
    """DCP's metadata from a manifest, every field checked for its type (a manifest is read
    from a folder anyone may have written: it must not be able to point outside the folder)."""
    try:
        state = {}
        for fqn, entry in doc["tensors"].items():
            if entry.get("bytes"):
                state[str(fqn)] = BytesStorageMetadata()
                continue
            dtype = getattr(torch, str(entry["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {entry['dtype']!r}")
            chunks = [ChunkStorageMetadata(offsets=torch.Size(_ints(o)), sizes=torch.Size(_ints(s)))
                      for o, s in entry["chunks"]]
            size = torch.Size(_ints(entry["size"]))
            state[str(fqn)] = TensorStorageMetadata(TensorProperties(dtype=dtype), size, chunks)
        storage = {}
        for item in doc["storage"]:
            file = str(item["file"])
            if not _DATA_FILE.fullmatch(file):
                raise ValueError(f"a data file named {file!r}")
            offset = None if item["offset"] is None else _ints(item["offset"])
            index = MetadataIndex(str(item["fqn"]), offset, None if item["index"] is None else int(item["index"]))
            storage[index] = _StorageInfo(file, _int(item["at"]), _int(item["length"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: {MANIFEST} does not describe its tensors ({e}); load an earlier "
            "checkpoint") from None
    version = doc.get("version")
    return Metadata(state_dict_metadata=state, storage_data=storage, storage_meta=StorageMeta(),
                    version=str(version) if version is not None else None)


def _int(x) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ValueError(f"{x!r} is not a size or an offset")
    return x


def _ints(xs) -> list[int]:
    if not isinstance(xs, list):
        raise ValueError(f"{xs!r} is not a list of sizes")
    return [_int(x) for x in xs]


def crc(folder: str, info) -> int:
    """CRC-32 of the stored box ``info`` (a DCP ``_StorageInfo``) of ``folder`` (-1: cut short)."""
    with open(os.path.join(folder, info.relative_path), "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    return zlib.crc32(data) if len(data) == info.length else -1


def checksums(folder: str, md: Metadata, share: tuple[int, int] = (0, 1)) -> dict:
    """CRC-32 of every stored box in this rank's share (rank, world) of the data files."""
    files = sorted({info.relative_path for info in md.storage_data.values()})
    r, w = share
    mine = set(files[r::w])
    out: dict = {}
    for info in md.storage_data.values():
        if info.relative_path in mine:
            out.setdefault(info.relative_path, {})[str(info.offset)] = crc(folder, info)
    return out


def write(folder: str, doc: dict) -> None:
    """Write the manifest, durably: it is what makes the folder a checkpoint."""
    doc = {"format": FORMAT, "saved": time.time(), **doc}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        f.write(json.dumps(doc))
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> dict | None:
    """The manifest of ``path`` (None if it has none)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is damaged: {MANIFEST} is not readable ({e}); load an "
                              "earlier checkpoint") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint '{path}' is damaged: {MANIFEST} is not an object; load an earlier "
                              "checkpoint")
    return doc


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder holding an fxpar manifest."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def check_target(path: str) -> None:
    """Refuse, before touching anything, a save that would replace what is not a checkpoint:
    a file, or a folder of the user's (``save`` replaces ``path`` and removes ``path.old``)."""
    for p in (path, path + OLD):
        if os.path.lexists(p) and not os.path.isdir(p):
            raise CheckpointError(f"cannot save a checkpoint to '{path}': '{p}' exists and is not a folder; "
                                  "choose another path or remove it")
        if os.path.isdir(p) and os.listdir(p) and not is_checkpoint(p):
            raise CheckpointError(
                f"cannot save a checkpoint to '{path}': '{p}' is a folder that is not an fxpar checkpoint (it has no "
                f"{MANIFEST}), and saving would replace it; choose another path (e.g. '{path}/step_100') or remove it")
    tmp = path + PARTIAL
    if os.path.lexists(tmp) and not os.path.isdir(tmp):
        raise CheckpointError(f"cannot save a checkpoint to '{path}': '{tmp}' exists and is not a folder; remove it")
    if os.path.isdir(tmp):
        strange = [f for f in os.listdir(tmp) if not _OWN_FILES.fullmatch(f)]
        if strange:
            raise CheckpointError(f"cannot save a checkpoint to '{path}': '{tmp}' holds files a save does not write "
                                  f"({strange[:3]}); remove it")


def clear(path: str) -> None:
    """Before a save to ``path``: finish a commit an earlier save was cut in (``recover``), then
    remove what a save that did not finish left (``clear_partial``)."""
    recover(path)
    clear_partial(path)


def finish(tmp: str, path: str, md: Metadata, checksums: list[dict], doc: dict) -> None:
    """Write the manifest of the complete folder ``tmp`` (``doc``, DCP's metadata ``md`` and every
    rank's ``checksums``), then make it the checkpoint ``path`` (``commit``)."""
    merged: dict = {}
    for part in checksums:
        merged.update(part)
    write(tmp, {**doc, **metadata_to_json(md), "checksums": merged})
    commit(tmp, path)


def clear_partial(path: str) -> None:
    """Remove what a save that did not finish left (``check_target`` said it is only that)."""
    tmp = path + PARTIAL
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)


def recover(path: str) -> None:
    """Finish a commit cut short between its renames: ``path`` is gone, and either the new
    checkpoint is whole in ``path.partial`` (its manifest written) or the old one in ``path.old``."""
    if os.path.lexists(path):
        return
    if is_checkpoint(path + PARTIAL):
        os.rename(path + PARTIAL, path)
    elif is_checkpoint(path + OLD):
        os.rename(path + OLD, path)


def commit(tmp: str, path: str) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``path``, replacing an older one."""
    old = path + OLD
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def latest(root: str) -> str | None:
    """The checkpoint in folder ``root`` saved last (by the time its manifest records), or None.

    >>> fxpar.latest_checkpoint("ckpt")   # after saves to ckpt/step_100 and ckpt/step_200  # doctest: +SKIP
    'ckpt/step_200'
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    best, when = None, None
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith((PARTIAL, OLD)) or not is_checkpoint(path):
            continue
        try:
            doc = read(path)
        except CheckpointError:
            continue
        saved = doc.get("saved") if isinstance(doc.get("saved"), (int, float)) else 0.0
        if doc.get("format") == FORMAT and (when is None or saved >= when):
            best, when = path, saved
    return best


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


def open_folder(path: str, trusted: bool) -> tuple[dict | None, Metadata | None]:
    """``(manifest, DCP metadata)`` of a checkpoint folder to load. Only a trusted folder may
    lack a manifest; its metadata is then None: DCP's pickle, which the reader unpickles."""
    if path.endswith(PARTIAL):
        raise CheckpointError(f"'{path}' is a save that did not finish; it cannot be loaded: load the checkpoint "
                              "saved before it (fxpar.latest_checkpoint finds it)")
    if not os.path.isdir(path):
        if is_checkpoint(path + OLD):
            raise CheckpointError(f"no checkpoint at '{path}': a save replacing it was cut short; the previous one is "
                                  f"whole at '{path + OLD}' (the next fxpar.save to '{path}' puts it back)")
        if os.path.isdir(path + PARTIAL):
            raise CheckpointError(f"no checkpoint at '{path}': a save to it did not finish "
                                  f"('{path + PARTIAL}' is what it left); load an earlier checkpoint")
        raise CheckpointError(f"no checkpoint at '{path}': give the folder fxpar.save wrote "
                              "(fxpar.latest_checkpoint(root) finds the newest in a folder of them)")
    doc = read(path)
    if doc is None or doc.get("format") != FORMAT:
        if not trusted:
            raise CheckpointError(_untrusted(path, doc))
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise CheckpointError(f"checkpoint '{path}' is incomplete: it has no .metadata file "
                                  "(a save cut short, or a damaged copy)")
        return doc, None
    return doc, metadata_from_json(doc, path)


def _untrusted(path: str, doc) -> str:
    why = (f"it has no {MANIFEST}, so it is not a checkpoint fxpar wrote" if doc is None else
           f"its {MANIFEST} is of format {doc.get('format')!r} (an earlier fxpar), which lists its tensors "
           "only in .metadata")
    return (
        f"fxpar will not load '{path}': {why}. Its description of the tensors is torch.distributed.checkpoint's "
        ".metadata, a pickle, and reading a pickle runs whatever code its author put in it. fxpar reads only "
        f"checkpoints whose {MANIFEST} (JSON) lists every tensor and checksum. If you wrote this folder "
        "yourself or trust whoever did, load it with fxpar.load(pm, path, trusted=True)."
    )


def check_files(md: Metadata, path: str) -> str | None:
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
                    f"'{user_key(index.fqn)}', is missing")
        if have < info.offset + info.length:
            return (f"checkpoint '{path}' is truncated: '{user_key(index.fqn)}' is stored at bytes "
                    f"{info.offset}..{info.offset + info.length} of {info.relative_path}, which has {have} bytes")
    return None
