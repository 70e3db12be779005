"""``fxpar.parallelize``: the one-liner."""

from __future__ import annotations

import torch.nn as nn

from .runtime.module import ParallelModule


def parallelize(model: nn.Module, mesh, example_args=None, example_kwargs=None, **options) -> ParallelModule:
    """This rank's share of ``model`` over ``mesh``, as an ``nn.Module`` that trains and infers
    like ``model``.

    Call it on every rank. Options: ``dynamic_shapes`` (symbolic batch/sequence sizes, in
    ``torch.export`` form or as names), ``overrides`` (``{"lm_head": "replicate", ...}`` by
    module or parameter name), ``rng`` (``"megatron"`` or ``"exact"``), ``device``, ``timeout``
    (a ``datetime.timedelta`` for every collective), ``seed`` and ``init_fn`` (to make the shards
    of a model built on the meta device; ``fxpar.load`` then fills them from weight files),
    ``loss_fn`` (for ``pm.train_step``: captured with the model, so a cross-entropy over logits
    split by vocabulary runs split), ``example_target`` (builds the training program first) and
    ``compile`` (``True`` or a dict of ``torch.compile`` arguments: every program this rank runs
    goes through ``torch.compile``).

    Example (under ``torchrun --nproc-per-node 2``)::

        pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,))
        opt = torch.optim.AdamW(pm.parameters(), lr=3e-4)
        loss = F.cross_entropy(pm(idx).flatten(0, 1), targets.flatten())
        loss.backward(); opt.step()

    With data-parallel replicas or expert parallelism (``Mesh(dp=..., ep=...)``) each rank
    passes its own part of the batch (part ``mesh.replica(rank)`` of ``mesh.replicas``) and
    trains with ``pm.train_step``, which averages the gradients over the replicas::

        mesh = fxpar.Mesh(ep=2, tp=2)   # 4 processes: experts over 2 ranks, each split over 2
        part = tokens.chunk(mesh.replicas)[mesh.replica(dist.get_rank())]
        pm = fxpar.parallelize(model, mesh, example_args=(part,), loss_fn=loss_fn, example_target=...)
        loss = pm.train_step(part, target=...)
    """
    return ParallelModule(model, mesh, example_args, example_kwargs, **options)
