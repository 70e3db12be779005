"""fxpar's side of ``torch.distributed.checkpoint``: the planners that save and load a flat
state dict holding ``Pieces`` (``checkpoint/pieces.py``), the reader that checks every stored box
against its checksum and takes DCP's metadata from the manifest, and DCP's failures as messages.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlan

from ..errors import CheckpointError, FxparError
from . import manifest
from .keys import user_key
from .pieces import lookup


class SavePlanner(DefaultSavePlanner):
    """Takes a flat state dict ("model.<name>", "optim.state.<name>.<key>", ...) holding Pieces."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        found = lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class LoadPlanner(DefaultLoadPlanner):
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
                f"the stored value '{user_key(read_item.dest_index.fqn)}' is not plain data that fxpar reads "
                f"without running code ({type(e).__name__}); if you trust this checkpoint, pass trusted=True"
            ) from None


class Reader(FileSystemReader):
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
                    f"checkpoint '{self.path}': reading '{user_key(fqn)}' failed: {type(e).__name__}: {e}") from e
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
                f"checkpoint '{self.path}' is damaged: the stored '{user_key(fqn)}' (in {info.relative_path} at byte "
                f"{info.offset}) does not match the checksum written when it was saved"
            )
        self._checked.add(key)


def reader(path: str, doc: dict | None, metadata) -> tuple[object, Reader]:
    """``(DCP metadata, reader)`` of the folder ``path`` opened by ``manifest.open``: ``metadata``
    built from its manifest ``doc``, or, for a trusted folder (``metadata`` None), DCP's own."""
    found = Reader(path, metadata, (doc or {}).get("checksums"))
    return (found.read_metadata() if metadata is None else metadata), found


def failure(e: CheckpointException, what: str) -> str:
    """The message of the first rank's failure (ours say which tensor; others get it prefixed)."""
    rank, (exc, _) = min(e.failures.items(), key=lambda kv: (not isinstance(kv[1][0], FxparError), kv[0]))
    if isinstance(exc, FxparError):
        return str(exc)
    return f"{what} on rank {rank}: {type(exc).__name__}: {exc}"
