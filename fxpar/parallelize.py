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

    ``mesh="auto"`` chooses the mesh and options with ``fxpar.autoplan`` for the current world
    (the device profile from ``torch.cuda.get_device_name()``, else ``"cpu"``; degrees given as
    options stay fixed: ``parallelize(model, "auto", tp=2, ...)``): ``example_args``
    (and ``example_target``) are then the global batch, the same on every rank; ``pm.mesh`` says
    which part of it each rank passes from then on (``pm.mesh.replica(rank)`` of
    ``pm.mesh.replicas``), and the chosen options are in the printed report.

    With data-parallel replicas or expert parallelism (``Mesh(dp=..., ep=...)``) each rank
    passes its own part of the batch (part ``mesh.replica(rank)`` of ``mesh.replicas``) and
    trains with ``pm.train_step``, which averages the gradients over the replicas::

        mesh = fxpar.Mesh(ep=2, tp=2)   # 4 processes: experts over 2 ranks, each split over 2
        part = tokens.chunk(mesh.replicas)[mesh.replica(dist.get_rank())]
        pm = fxpar.parallelize(model, mesh, example_args=(part,), loss_fn=loss_fn, example_target=...)
        loss = pm.train_step(part, target=...)
    """
    if isinstance(mesh, str) and mesh == "auto":
        mesh, example_args, example_kwargs, options = _planned(model, example_args, example_kwargs, options)
    return ParallelModule(model, mesh, example_args, example_kwargs, **options)


# options of the processes, not of the plan: kept from the planner's search
_RUNTIME = ("device", "timeout", "compile", "check_inputs", "seed", "init_fn", "dynamic_shapes")


def _planned(model, args, kwargs, options):
    """``mesh="auto"``: the best candidate of ``fxpar.autoplan`` for this world and device, with
    the example inputs (the global batch, the same on every rank) cut to this rank's part."""
    import torch
    import torch.distributed as dist
    from torch.utils import _pytree as pytree

    from .autoplan import autoplan
    from .devices import current_device
    from .errors import OptionError
    from .mesh import DIM_ORDER, ensure_process_group
    from .options import timeout as as_timeout

    if args is None:
        raise OptionError("fxpar.parallelize(model, 'auto') plans for the example inputs: give example_args (the "
                          "global batch, the same on every rank)")
    args = args if isinstance(args, tuple) else (args,)
    device = options.get("device")
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    ensure_process_group(device_type, as_timeout(options.get("timeout"), fallback=True))
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    batch = leaves[0].shape[0]
    first = lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() else t  # noqa: E731
    fixed = {k: v for k, v in options.items() if k not in _RUNTIME}
    if fixed.get("example_target") is not None:
        fixed["example_target"] = first(fixed["example_target"])
    profile = current_device() if device_type == "cuda" else "cpu"
    found = autoplan(model, world_size=dist.get_world_size(), device=profile,
                     global_batch=batch, example_args=pytree.tree_map(first, args),
                     example_kwargs=pytree.tree_map(first, kwargs or {}), verbose=dist.get_rank() == 0, **fixed)
    if not found:
        raise OptionError("fxpar.parallelize(model, 'auto'): no mesh fits this model on "
                          f"{dist.get_world_size()} devices; " + "; ".join(f"{w}: {r}" for w, r in found.rejected[:3]))
    best = found[0]
    mesh = best.mesh
    part = lambda t: (t.chunk(mesh.replicas)[mesh.replica(dist.get_rank())]  # noqa: E731
                      if isinstance(t, torch.Tensor) and t.dim() else t)
    options = {**{k: v for k, v in options.items() if k not in DIM_ORDER}, **best.options}
    if options.get("example_target") is not None:
        options["example_target"] = part(options["example_target"])
    return mesh, pytree.tree_map(part, args), pytree.tree_map(part, kwargs or {}) or None, options
