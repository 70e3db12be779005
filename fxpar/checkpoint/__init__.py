"""Loading weights into a ``ParallelModule`` and saving / resuming sharded checkpoints.

``fxpar.load(pm, path)`` reads whatever ``path`` is: a checkpoint ``fxpar.save`` wrote (or any
``torch.distributed.checkpoint`` folder with the model's names), a Hugging Face model folder, a
``.safetensors`` file or a ``torch.save`` state dict. Every rank reads only its own slices.
"""

from __future__ import annotations

import os

from ..errors import FxparError
from . import dcp
from .weights import LoadResult, load_weights


def save(pm, path, optimizer=None) -> None:
    """Save ``pm``'s shards (and ``optimizer``'s state) as a sharded checkpoint at ``path``,
    loadable on any mesh (``fxpar.load``) and by ``torch.distributed.checkpoint`` itself, keys
    being the model's original names. A collective: every rank calls it.

    >>> fxpar.save(pm, "ckpt/step_100", optimizer=opt)       # doctest: +SKIP
    >>> fxpar.load(pm2, "ckpt/step_100", optimizer=opt2)     # on another mesh  # doctest: +SKIP
    """
    dcp.save(pm, path, optimizer)


def load(pm, path, optimizer=None, *, strict: bool = True, rename=None) -> LoadResult:
    """Fill ``pm``'s shards from ``path``, reading only the slices this rank holds.

    ``path`` is a checkpoint of ``fxpar.save`` (then ``optimizer``, if given, gets its state back
    too, on any mesh), or weights: a Hugging Face model folder (``config.json`` with
    ``model.safetensors`` or ``model.safetensors.index.json`` and its shards), a ``.safetensors``
    file or a ``torch.save(state_dict)`` file. ``rename(key) -> name`` maps the names in weight
    files to the model's; ``strict=False`` loads what matches and reports the rest. Build the
    model on the meta device to never hold it whole::

        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(ids,))
        fxpar.load(pm, "path/to/llama")

    Loading a checkpoint is a collective (every rank calls it); loading weights is not.
    """
    path = os.fspath(path)
    if dcp.looks_like_checkpoint(path):
        if rename is not None:
            raise FxparError("rename= applies to weight files; a checkpoint of fxpar.save has the model's names")
        dcp.load(pm, path, optimizer, strict=strict)
        return LoadResult([], [])
    if optimizer is not None:
        raise FxparError(f"'{path}' holds weights only, not optimizer state: load it without optimizer=...")
    return load_weights(pm, path, strict=strict, rename=rename)


__all__ = ["save", "load", "LoadResult"]
