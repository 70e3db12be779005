"""Fill a rank's shards from weight files, reading only the slices the rank owns.

Sources: a Hugging Face model folder (``model.safetensors``, or shards listed by
``model.safetensors.index.json``; ``pytorch_model.bin`` and its index as a fallback), a single
``.safetensors`` file, or a file written by ``torch.save(model.state_dict(), path)``.

Files are memory-mapped and each piece is copied straight into the rank's parameter, so a rank
never holds another rank's slices or a whole tensor in its own memory. A mapped file's pages do
count as resident while mapped, and a column slice of a row-major tensor touches all its pages;
the files are therefore reopened after every ``budget`` bytes of tensors read, which bounds that
transient residency by the budget plus one tensor.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Callable, NamedTuple

import torch

from ..errors import CheckpointError, FxparError
from .layout import local_tensors

BUDGET = 16 * 2**20  # bytes of tensors read through one mapping before it is dropped


class LoadResult(NamedTuple):
    """Names of the model missing from the files, and names in the files the model lacks (as
    ``torch.nn.Module.load_state_dict`` reports them); ``extra``: what ``fxpar.save`` was given as
    ``extra=`` (None for weight files)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    extra: dict | None = None


def weight_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` for a weights folder or file."""
    if os.path.isfile(path):
        return {name: path for name in _keys(path)}
    if not os.path.isdir(path):
        raise FxparError(f"no weights at '{path}': give a Hugging Face model folder, a .safetensors file or a torch.save file")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: _inside(path, file, index) for name, file in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        file = os.path.join(path, single)
        if os.path.exists(file):
            return {name: file for name in _keys(file)}
    raise FxparError(
        f"'{path}' holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        f"its files: {sorted(os.listdir(path))[:10]}"
    )


def _inside(folder: str, file, index: str) -> str:
    """A file an index names, which must be named inside the index's folder (an index is read
    from a folder anyone may have written: it must not make a rank read files elsewhere). The
    name is checked as written: a Hugging Face cache links every file to a blob elsewhere."""
    name = os.path.normpath(str(file))
    if os.path.isabs(name) or name == ".." or name.startswith(".." + os.sep):
        raise CheckpointError(
            f"'{os.path.join(folder, index)}' names the weight file {file!r}, which is outside '{folder}': an index "
            "names files of its own folder; fix the index, or load the file itself")
    return os.path.join(folder, name)


def _is_safetensors(file: str) -> bool:
    return file.endswith(".safetensors")


class _Mapped:
    """One file, memory-mapped; ``tensor(name)`` is a view of the mapping (nothing read yet)."""

    def __init__(self, file: str):
        self.file = file
        if _is_safetensors(file):
            from safetensors import safe_open

            self._st = safe_open(file, framework="pt")
            self._sd = None
        else:
            self._st = None
            sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            self._sd = _unwrap(sd, file)

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(name).get_shape())
        return tuple(self._sd[name].shape)

    def read(self, name: str, offsets, sizes) -> torch.Tensor:
        index = tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
        if self._st is not None:
            return self._st.get_slice(name)[index]
        return self._sd[name][index]

    def close(self) -> None:
        if self._st is not None:
            self._st.__exit__(None, None, None)
        self._st = self._sd = None


def _unwrap(sd, file: str) -> dict:
    """The state dict inside what ``torch.save`` wrote (a bare one, or under "model"/"state_dict")."""
    if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("model", "state_dict", "module"):
            if isinstance(sd.get(key), dict):
                return sd[key]
    if not isinstance(sd, dict):
        raise FxparError(f"'{file}' holds a {type(sd).__name__}, not a state dict")
    return sd


def _keys(file: str) -> list[str]:
    m = _Mapped(file)
    try:
        return m.keys()
    finally:
        m.close()


def _match(names: dict, keys: set[str], rename: Callable[[str], str] | None) -> dict[str, str]:
    """``{model name: key in the files}``. Tries every alias of a tied tensor, then a prefix the
    files lack or add (a checkpoint of ``GPT2Model`` read into ``GPT2LMHeadModel``: "h.0..." for
    "transformer.h.0...")."""
    if rename is not None:
        keys_by = {rename(k): k for k in keys}
    else:
        keys_by = {k: k for k in keys}
    out = {}
    for name, (aliases, _, _) in names.items():
        hit = next((a for a in aliases if a in keys_by), None)
        if hit is not None:
            out[name] = keys_by[hit]
    if rename is None and len(out) < len(names):
        prefixes = {a.split(".", 1)[0] + "." for aliases, _, _ in names.values() for a in aliases if "." in a}
        best = out
        for p in prefixes:
            trial = dict(out)
            for name, (aliases, _, _) in names.items():
                for a in aliases:
                    for k in (a[len(p):] if a.startswith(p) else None, p + a):
                        if k is not None and k in keys:
                            trial.setdefault(name, k)
            if len(trial) > len(best):
                best = trial
        out = best
    return out


@torch.no_grad()
def load_weights(pm, path: str, *, strict: bool = True, rename=None, budget: int = BUDGET) -> LoadResult:
    """Copy this rank's slices of the tensors in ``path`` into ``pm`` (see the module doc).

    ``rename(key) -> name`` maps the files' names to the model's when they differ. With
    ``strict``, a tensor of the model the files lack, or a tensor of the files the model lacks,
    is an error; otherwise both are reported in the result. Not a collective: every rank reads
    its own slices.
    """
    files = weight_files(path)
    names = pm.geometry.full_names()
    match = _match(names, set(files), rename)
    used = set(match.values())
    missing = sorted(n for n in names if n not in match)
    unexpected = sorted(k for k in files if k not in used and not _is_alias_of_matched(k, names, match))
    if strict and (missing or unexpected):
        raise FxparError(
            f"the weights at '{path}' do not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; pass rename=... to map the names, "
            "or strict=False to load what matches"
        )
    todo = defaultdict(list)
    for lt in local_tensors(pm):
        if lt.name in match:
            key = match[lt.name]
            todo[files[key]].append((key, lt))
    for file, items in todo.items():
        mapped, read = _Mapped(file), 0
        try:
            for key, lt in items:
                shape = mapped.shape(key)
                if tuple(shape) != tuple(lt.shape):
                    raise FxparError(
                        f"'{lt.name}' has shape {tuple(lt.shape)} in the model but {tuple(shape)} in '{file}' "
                        f"(as '{key}'): the weights belong to a different configuration"
                    )
                for offsets, view in lt.pieces:
                    view.copy_(mapped.read(key, offsets, view.shape))
                read += lt.tensor.element_size() * _numel(shape)
                if read >= budget:  # drop the pages read so far: see the module doc
                    mapped.close()
                    mapped, read = _Mapped(file), 0
        finally:
            mapped.close()
    return LoadResult(missing, unexpected)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_alias_of_matched(key: str, names: dict, match: dict) -> bool:
    """A checkpoint that stores a tied tensor under each of its names: the second copy is fine."""
    for name, k in match.items():
        if key != k and key in names[name][0]:
            return True
    return False
