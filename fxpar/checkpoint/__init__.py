"""Loading weights into a ``ParallelModule`` and saving / resuming sharded checkpoints.

``fxpar.load(pm, path)`` reads whatever ``path`` is: a checkpoint ``fxpar.save`` wrote, a Hugging
Face model folder, a ``.safetensors`` file or a ``torch.save`` state dict. Every rank reads only
its own slices. Nothing read can run code: weights are read as safetensors or with
``torch.load(weights_only=True)``, and a checkpoint folder is read through fxpar's JSON manifest,
never through DCP's pickled ``.metadata``, unless the caller passes ``trusted=True``.
"""

from __future__ import annotations

import os
import warnings

from ..errors import CheckpointError
from . import dcp
from .manifest import latest as latest_checkpoint
from .weights import LoadResult, load_weights


def save(pm, path, optimizer=None, *, extra: dict | None = None) -> None:
    """Save ``pm``'s shards (and ``optimizer``'s state) as a sharded checkpoint at ``path``,
    loadable on any mesh (``fxpar.load``) and by ``torch.distributed.checkpoint`` itself, keys
    being the model's original names. A collective: every rank calls it.

    ``extra`` is a small JSON-serializable dict stored with the checkpoint and returned by
    ``load`` (a step, a data position); every rank's random-number states (``pm.rng_state()``)
    are stored too. ``path`` must be a new path, an empty folder or an earlier checkpoint, which
    is replaced once the new one is complete.

    >>> fxpar.save(pm, "ckpt/step_100", optimizer=opt, extra={"step": 100})   # doctest: +SKIP
    >>> fxpar.load(pm2, "ckpt/step_100", optimizer=opt2).extra               # doctest: +SKIP
    {'step': 100}
    """
    dcp.save(pm, path, optimizer, extra=extra)


def load(pm, path, optimizer=None, *, strict: bool = True, rename=None, trusted: bool = False,
         restore_rng: bool = True) -> LoadResult:
    """Fill ``pm``'s shards from ``path``, reading only the slices this rank holds; returns a
    ``LoadResult(missing_keys, unexpected_keys, extra)``.

    ``path`` is a checkpoint of ``fxpar.save`` (then ``optimizer``, if given, gets its state back
    too, on any mesh; on the mesh it was saved on, every rank's random-number states come back
    unless ``restore_rng=False``; ``extra`` is what the save was given), or weights: a Hugging
    Face model folder (``config.json`` with ``model.safetensors`` or
    ``model.safetensors.index.json`` and its shards), a ``.safetensors`` file or a
    ``torch.save(state_dict)`` file. ``rename(key) -> name`` maps the names in weight files to the
    model's; ``strict=False`` loads what matches and reports the rest (``strict=True``: either is
    an error). A folder of ``torch.distributed.checkpoint`` that fxpar did not write is refused
    unless ``trusted=True`` (its ``.metadata`` is a pickle). Build the model on the meta device
    to never hold it whole::

        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(ids,))
        fxpar.load(pm, "path/to/llama")

    Loading a checkpoint is a collective (every rank calls it), and all or nothing: on any error
    the model and the optimizer are as they were. Loading weights is not a collective.
    """
    path = os.fspath(path)
    if dcp.looks_like_checkpoint(path):
        if rename is not None:
            raise CheckpointError("rename= applies to weight files; a checkpoint of fxpar.save has the model's names")
        missing, unexpected, extra, notes = dcp.load(pm, path, optimizer, strict=strict, trusted=trusted,
                                                     restore_rng=restore_rng)
        for note in notes:
            warnings.warn(f"fxpar: {note}", stacklevel=2)
        return LoadResult(missing, unexpected, extra)
    if optimizer is not None:
        raise CheckpointError(f"'{path}' holds weights only, not optimizer state: load it without optimizer=...")
    return load_weights(pm, path, strict=strict, rename=rename)


__all__ = ["save", "load", "latest_checkpoint", "LoadResult"]
