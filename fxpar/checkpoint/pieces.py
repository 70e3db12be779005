"""A tensor as the boxes one rank holds of it: the form in which DCP saves and loads it."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ..errors import CheckpointError


class Pieces:
    """``pieces``: ``(offsets in the full tensor of ``shape``, view)`` boxes this rank holds
    (the ``_Checkpointable`` protocol DTensor implements). ``local``: the tensor the views are
    of, where it is one (the staging tensor of a load)."""

    def __init__(self, shape, pieces, local: torch.Tensor | None = None):
        self.shape = torch.Size(shape)
        self.pieces = pieces
        self.local = local

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
        raise CheckpointError(f"no piece of '{index.fqn}' at offsets {tuple(index.offset)} on this rank")


def lookup(state_dict, index):
    """The view a DCP index names, when the state holds ``Pieces`` there (else None)."""
    obj = state_dict[index.fqn]
    if isinstance(obj, Pieces):
        return obj.__get_tensor_shard__(index)
    return None
