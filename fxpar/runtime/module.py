"""``ParallelModule``: what ``fxpar.parallelize`` returns on each rank.

It holds only this rank's shards (of its pipeline stages), registered under the model's original
names, and runs the rank's generated programs. Programs are made per input signature (shapes that
are not dynamic, dtypes, train/eval mode), like ``torch.compile`` recompiles; all of them share
the same parameters, and a new signature must place parameters the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from .. import report
from ..capture import TARGET, capture, meta_skeleton
from ..errors import CaptureError, FxparError
from ..mesh import DIM_ORDER, Mesh, as_mesh, ensure_process_group
from ..options import PlanOptions, check_inputs_mode, plain as plain_data, timeout as as_timeout
from ..placement import REPLICATE, Shard
from ..planning import first_microbatch, plan_graph
from ..memory import expr
from ..shards import local_shape
from ..ops.collectives import _assemble
from .agree import Group, agree, agree_on_failure
from .checks import (
    callable_name, check_loss_call, check_not_meta, explain_contents, explain_options, explain_plan, explain_signature,
    explain_structure, explain_values, input_summaries, model_structure, model_values, plan_summary,
)
from .comm import DistComm, LocalComm
from ..ops.context import RankContext, RNGStreams, context_streams, running, stream_seeds
from .p2p import DistP2P
from .pipeline import join_microbatches, microbatch_size, split_microbatches
from .rank import RankProgram


class ParallelModule(nn.Module):
    """One rank's share of a model, trained and run like the model itself.

    ``parameters()`` are the local shards (hand them to any optimizer), ``state_dict()`` is local
    under the original names, ``full_state_dict()`` gathers every full tensor on every rank.

    With tensor parallelism only, ``pm(*args)`` runs the model and ``loss.backward()`` works as
    usual. With pipeline stages, data-parallel replicas or expert parallelism (whose ranks are
    replicas for everything but the experts), train with ``pm.train_step(*args,
    target=y)`` (forward, loss and backward over all microbatches under the schedule, gradients
    synchronized; returns the mean loss on every rank) and use ``pm(*args)`` for inference.
    Without example inputs, the model is captured at the first call; create the optimizer after
    that call (``parameters()`` raises before it).
    """

    def __init__(
        self,
        model: nn.Module,
        mesh,
        example_args=None,
        example_kwargs=None,
        *,
        loss_fn=None,
        example_target=None,
        dynamic_shapes=None,
        overrides=None,
        rng: str = "megatron",
        device=None,
        timeout: datetime.timedelta | None = None,
        seed: int = 0,
        init_fn=None,
        compile=False,  # noqa: A002 - the option's name: parallelize(..., compile=True)
        check_inputs: str = "first",
        **options,
    ):
        super().__init__()
        # every option is checked here, on every rank, before anything is bound or sent; a rank
        # whose options are refused makes the others raise too (once a process group exists)
        plain = as_mesh(mesh)
        device = torch.device(device) if device is not None else _default_device()
        try:
            timeout = as_timeout(timeout)
            check_inputs = check_inputs_mode(check_inputs)
            plan_options = PlanOptions.from_user("fxpar.parallelize()", overrides=overrides or {}, rng=rng,
                                                 device_type=device.type, **options)
            compile_options = _compile_options(compile)
            refused = None
        except FxparError as e:
            if not dist.is_initialized():  # no peers to tell yet
                raise
            refused, timeout = e, None
        wait = timeout or as_timeout(None, fallback=True)
        if isinstance(mesh, Mesh):
            ensure_process_group(device.type, wait)
        everyone = _everyone(plain, wait, device, isinstance(mesh, Mesh))
        agree_on_failure(everyone, lambda: _reraise(refused), "to take the options of fxpar.parallelize")
        # the mesh and the options agree before any process group is made for the mesh
        agree(everyone, {
            "mesh": repr(plain), **plan_options.summary(), "dynamic_shapes": plain_data(dynamic_shapes),
            "seed": seed, "loss_fn": callable_name(loss_fn), "init_fn": callable_name(init_fn),
            "compile": plain_data(compile_options), "check_inputs": check_inputs, "device": device.type,
            "example_target": example_target is not None, "timeout": timeout.total_seconds(),
        }, explain_options)
        device_mesh = plain.bind(device.type, timeout) if isinstance(mesh, Mesh) else mesh
        names = tuple(device_mesh.mesh_dim_names)
        comms = {}
        for dim in DIM_ORDER:
            size = getattr(plain, dim)
            comms[dim] = DistComm(device_mesh.get_group(dim), timeout, dim) if size > 1 else LocalComm()
        coord = dict(zip(names, device_mesh.get_coordinate()))
        rank = plain.rank_of(**coord)

        def to_global(r: int) -> int:  # a position on the mesh -> its rank in the world
            c = plain.coordinate(r)
            return int(device_mesh.mesh[tuple(c[n] for n in names)])

        replica_of = [0] * plain.size  # by global rank: the part of the batch it trains on
        for r in range(plain.size):
            replica_of[to_global(r)] = plain.replica(r)

        where = plain.coordinate(rank)
        pp_rank = where["pp"]
        rep_seed, tp_seed = stream_seeds(torch.initial_seed(), comms["tp"].rank, pp_rank)
        sharded = torch.Generator(device=device).manual_seed(tp_seed)
        # one stage: torch's default generator, as the model would use; several: one per stage
        replicated = None if plain.pp == 1 else torch.Generator(device=device).manual_seed(rep_seed)
        streams = RNGStreams(replicated, sharded, rng == "exact")
        if plain.cp > 1:
            streams.context, streams.context_sharded = context_streams(
                torch.initial_seed(), comms["tp"].rank, pp_rank, where["cp"], device)
        self.training = model.training
        # plain attributes, not submodules: they must not show in parameters() or state_dict()
        self.__dict__.update(
            _mesh=plain,
            _device_mesh=device_mesh,
            _rank=rank,
            _to_global=to_global,
            _device=device,
            _comms=comms,
            _ctx=RankContext(rank=comms["tp"].rank, comms=comms, rng=streams),
            _p2p=DistP2P(timeout),
            _skeleton=meta_skeleton(model),
            _source=model,
            _loss_fn=loss_fn,
            _plan_options=plan_options,
            _dynamic_shapes=dynamic_shapes,
            _microbatches=plan_options.microbatches,
            _seed=seed,
            _init_fn=init_fn,
            _compile=compile_options,
            _check_mode=check_inputs,
            _everyone=everyone,
            _replica_of=replica_of,
            _loss_in_graph=dynamic_shapes is None,
            _programs={},
            _plans=[],
            _placements=None,
            _captured=None,
            _dynamic=None,
            _held=None,
        )
        agree(everyone, model_structure(model), explain_structure)
        agree(everyone, model_values(model), explain_values)
        built = None
        if example_target is not None and loss_fn is not None:
            # the training graph decides how the weights are split (it knows what the loss reads)
            with_target = {**(example_kwargs or {}), TARGET: example_target}
            self._check_call(_as_tuple(example_args), with_target)
            built = self._loss_program(_as_tuple(example_args), with_target)
        if built is None and (example_args is not None or example_kwargs):
            self._check_call(_as_tuple(example_args), dict(example_kwargs or {}))
            self._program(_as_tuple(example_args), dict(example_kwargs or {}))

    @property
    def _comm(self):
        return self._comms["tp"]

    # running -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._check_call(args, kwargs)
        prog = self._program(args, kwargs)
        with running(self._ctx):
            if prog.full is not None and (self._mesh.replicas == 1 or not _training(self)):
                if self._microbatches == 1:
                    return prog.full(*args, **kwargs)
                # captured for one microbatch: run the batch as microbatches
                flat, spec = pytree.tree_flatten((args, kwargs))
                mbs = split_microbatches(flat, self._microbatches)
                parts = [pytree.tree_unflatten(mb, spec) for mb in mbs]
                return join_microbatches([prog.full(*a, **k) for a, k in parts], microbatch_size(mbs))
            if _training(self):
                raise FxparError(
                    f"with {self._mesh} train with pm.train_step(*args, target=...): it runs the pipeline "
                    "schedule and synchronizes gradients; pm(...) is for inference (use torch.no_grad() or pm.eval())"
                )
            mbs = split_microbatches(self._flat(prog, args, kwargs), self._microbatches)
            self.__dict__["_last"] = prog
            return self._everywhere(prog, mbs)

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward, loss and backward of one batch (this data-parallel replica's part) over all
        microbatches under the pipeline schedule; gradients of tied parameters are summed over the
        stages holding them and averaged over replicas. Returns the mean loss, on every rank; then
        step the optimizer on ``pm.parameters()``. ``loss_fn(output, target)`` (or
        ``loss_fn(output)`` without a target) is the one given to ``fxpar.parallelize``; it should
        be a mean over its microbatch (as ``F.cross_entropy`` is by default): the step's loss and
        gradients are the mean over microbatches, which equals the whole batch's mean."""
        # checked on every rank before anything is sent: a rank that raised alone would leave the
        # others waiting for it
        if self._loss_fn is None:
            raise FxparError("train_step needs the loss: pass loss_fn=... to fxpar.parallelize")
        if not torch.is_grad_enabled():
            raise FxparError("train_step computes gradients: call it outside torch.no_grad()")
        with_target = {**kwargs, TARGET: target}
        self._check_call(args, with_target)  # with or without a target, on every rank alike
        check_loss_call(self._loss_fn, target)
        m = self._microbatches
        prog = self._loss_program(args, with_target)
        if prog is not None:
            mbs = split_microbatches(self._flat(prog, args, with_target), m)
            targets, loss_fn = None, None
        else:
            prog = self._program(args, kwargs, inputs=with_target)
            mbs = split_microbatches(self._flat(prog, args, kwargs), m)
            targets = None if target is None else [t[0] for t in split_microbatches([target], m)]
            loss_fn = self._loss_fn
        self.__dict__["_last"] = prog
        with running(self._ctx):
            return prog.runner.train_step(mbs, targets, loss_fn, prog.params)

    def _loss_program(self, args, kwargs):
        """The program computing model and loss as one graph, or None where the loss runs after
        the model's program (dynamic shapes, or a loss_fn that does not capture).

        Captured with the model, a cross-entropy over logits split by vocabulary runs split, and
        nothing only the loss reads (the logits) is gathered."""
        if not self._loss_in_graph:
            return None
        try:
            return self._program(args, kwargs, loss=True)
        except CaptureError as e:
            self.__dict__["_loss_in_graph"] = False
            warnings.warn(
                "fxpar: loss_fn could not be captured with the model, so it runs on the gathered outputs "
                f"instead (no vocabulary-parallel loss): {str(e).splitlines()[0]}",
                stacklevel=3,
            )
            return None

    def _flat(self, prog, args, kwargs) -> list:
        return list(fx_pytree.tree_flatten_spec((args, kwargs), prog.captured.gm._in_spec))

    def _everywhere(self, prog, mbs):
        """Pipelined inference, the output given to every rank of the pipeline."""
        outs = prog.runner.forward(mbs)
        comm = self._comms["pp"]
        last = prog.schedule.stage_rank[-1] == self._pp_rank
        output = next(n for n in prog.captured.gm.graph.nodes if n.op == "output")
        leaves = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        results = []
        for i in range(len(mbs)):
            mine = outs[i] if last else [self._zeros_like(x, prog) for x in leaves]
            shared = [comm.all_reduce(t) if isinstance(t, torch.Tensor) and comm.world > 1 else t for t in mine]
            results.append(pytree.tree_unflatten(shared, prog.captured.gm._out_spec))
        return join_microbatches(results, microbatch_size(mbs))

    def _zeros_like(self, leaf, prog):
        """What a rank without the last stage contributes for an output leaf: zeros of its shape."""
        val = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return leaf if not isinstance(leaf, torch.fx.Node) else val
        shape = [d if isinstance(d, int) else int(expr(d).subs(prog.runner.sizes)) for d in val.shape]
        return torch.zeros(shape, dtype=val.dtype, device=self._device)

    def _program(self, args, kwargs, loss: bool = False, inputs: dict | None = None):
        """The program for these inputs (their signature agreed by ``_check_call``), built at the
        signature's first call. ``inputs``: the keyword inputs the ranks of a replica must agree
        on the values of (default ``kwargs``; a target besides)."""
        prog = self._programs.get((loss, self._key(args, kwargs)))
        if prog is None or self._check_mode == "always":
            self._check_contents(args, kwargs if inputs is None else inputs)
        if prog is None:
            prog = self._build(args, kwargs, loss)
            # keyed after building: the first capture tells which dims are symbolic
            self._programs[(loss, self._key(args, kwargs))] = prog
        return prog

    def _check_call(self, args, kwargs) -> None:
        """At every call, every rank agrees on the inputs' kinds (structure, shapes but for the
        dynamic sizes, dtypes, Python values) and on train/eval mode: a call whose program is new
        on one rank only would send that rank into checks its peers never join. One all-gather
        of 8 bytes; ``check_inputs="never"`` skips it."""
        check = self._check_mode != "never" and self._everyone.world > 1
        signature, contents = input_summaries(self._skeleton.forward, args, kwargs, self._dynamic, digests=False)
        if check:
            agree(self._everyone, {**signature, "mode": "train" if self.training else "eval"}, explain_signature)
        check_not_meta(contents)

    def _check_contents(self, args, kwargs) -> None:
        """The ranks of a replica agree on the values of the inputs."""
        if self._check_mode == "never" or self._everyone.world == 1 or self._mesh.size == self._mesh.replicas:
            return
        _, contents = input_summaries(self._skeleton.forward, args, kwargs, self._dynamic)
        agree(self._everyone, contents, explain_contents(self._replica_of), self._replica_of)

    def _key(self, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        dyn = self._dynamic or {}
        parts, k = [], 0
        for x in leaves:
            if isinstance(x, torch.Tensor):
                shape = tuple(None if d in dyn.get(k, ()) else s for d, s in enumerate(x.shape))
                parts.append((shape, x.dtype))
                k += 1
            else:
                parts.append(x)
        return (self.training, str(spec), tuple(parts))

    def _build(self, args, kwargs, loss: bool = False) -> RankProgram:
        first = self._placements is None
        plan = lambda: self._plan(args, kwargs, loss)  # noqa: E731
        cap, gm, ctx = agree_on_failure(self._everyone, plan, "to capture and plan the model")
        agree(self._everyone, plan_summary(ctx), explain_plan)
        if not first:
            held = {p for s in ctx.pipeline.stages if s.rank == self._pp_rank for p in s.params}
            first_ctx = self._plan_ctx
            experts_moved = (ctx.expert_shards, ctx.expert_slots) != (first_ctx.expert_shards, first_ctx.expert_slots)
            if held != self._held or experts_moved or any(
                    ctx.param_placements.get(k, REPLICATE) != v for k, v in self._placements.items()):
                raise FxparError(
                    "these inputs lead to a different placement of the parameters than the first call; "
                    "parallelize a separate module for them"
                )
        for w in ctx.warnings:
            warnings.warn(f"fxpar: {w}", stacklevel=3)
        replicated = report.replication_warning(gm, ctx) if first else None
        if replicated:
            warnings.warn(f"fxpar: {replicated}", stacklevel=3)
        prog = agree_on_failure(self._everyone, lambda: RankProgram(
            self, cap, gm, ctx, self._mesh, self._rank, self._device, self._p2p,
            source=self._source, seed=self._seed, init_fn=self._init_fn, populate=first, to_global=self._to_global,
            compile_options=self._compile,
        ), "to build its shards and programs")
        if first:
            self.__dict__.update(
                _placements=dict(ctx.param_placements),
                _captured=cap,
                _source=None,
                _dynamic=_dynamic_dims(cap),
                _held={p for s in ctx.pipeline.stages if s.rank == self._pp_rank for p in s.params},
            )
            self._check_rng(gm)
        self._plans.append((gm, ctx))
        return prog

    @property
    def _pp_rank(self) -> int:
        return self._mesh.coordinate(self._rank)["pp"]

    def _plan(self, args, kwargs, loss: bool):
        """Capture and plan on this rank alone (no communication): ``(captured, graph, ctx)``."""
        self._skeleton.train(self.training)
        mb_args, mb_kwargs = first_microbatch(args, kwargs, self._microbatches)
        cap = capture(self._skeleton, mb_args, mb_kwargs, dynamic_shapes=self._dynamic_shapes,
                      loss_fn=self._loss_fn if loss else None)
        options = self._plan_options
        if self._placements is not None:  # the parameters stay as they are: split the same way, in the same stages
            keep = {"fixed_weights": dict(self._placements)}
            if self._mesh.pp > 1:
                spec = self._plans[0][1].pipeline
                keep["param_stages"] = {p: s.index for s in spec.stages for p in s.params if p not in spec.tied}
            options = options.replace(**keep)
        gm, ctx = plan_graph(cap, self._mesh, options)
        return cap, gm, ctx

    def _check_rng(self, gm) -> None:
        """Replicated dropout needs the same random state on every tp rank: warn if it is not."""
        from ..ops.local import dropout

        if self._comm.world == 1 or not any(n.target is dropout and n.args[1] for n in gm.graph.nodes):
            return
        gen = torch.cuda.default_generators[self._device.index or 0] if self._device.type == "cuda" else torch.default_generator
        digest = hashlib.sha1(gen.get_state().numpy().tobytes()).digest()[:8]
        mine = torch.tensor(list(digest), dtype=torch.int64, device=self._device)
        states = self._comm.exchange(mine)
        if any(not torch.equal(s, states[0]) for s in states):
            warnings.warn(
                "fxpar: tensor-parallel ranks have different random states, so dropout in replicated "
                "regions will draw different masks; call torch.manual_seed(same_seed) on every rank",
                stacklevel=4,
            )

    # parameters and state ----------------------------------------------------------------------
    def _require_built(self) -> None:
        if self._placements is None:
            raise FxparError(
                "this ParallelModule has not been built yet: its parameter shards are made at the first "
                "call (or pass example_args to fxpar.parallelize); create the optimizer after that"
            )

    def named_parameters(self, *args, **kwargs):
        self._require_built()
        return super().named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        self._require_built()
        return super().parameters(recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._placements is not None:  # before the first call there is nothing to zero
            super().zero_grad(set_to_none)

    def placement_of(self, name: str):
        """Placement of a parameter or buffer on the tp dimension (for an expert split over ep,
        of this ep rank's part of it: see ``local_shard``)."""
        target = self._captured.graph_name(name)
        slot = self._plan_ctx.expert_slot(target)
        return self._placements.get(slot[0] if slot else target, REPLICATE)

    def local_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``, a whole value of parameter or buffer ``name`` (its
        gradient, a checkpoint's tensor): the ep rank's experts of a stacked expert weight, then
        the tp rank's slice. An expert module's weight that another ep rank holds: ``None``."""
        from ..shards import shard_tensor

        target = self._captured.graph_name(name)
        ctx, ep = self._plan_ctx, self._mesh.coordinate(self._rank)["ep"]
        slot = ctx.expert_slot(target)
        if slot is not None and slot[1] != ep:
            return None
        over_ep = ctx.expert_shards.get(target)
        if over_ep is not None:
            full = shard_tensor(full, over_ep, ep)
        return shard_tensor(full, self.placement_of(name), self._comm.rank)

    def _pieces(self, name: str, local: torch.Tensor) -> list:
        """``(offsets in the full tensor, view)`` boxes of this rank's ``local`` part of ``name``."""
        from ..checkpoint.layout import pieces_of

        pieces = pieces_of(local, self.placement_of(name), self._comm.rank)
        over_ep = self._plan_ctx.expert_shards.get(self._captured.graph_name(name))
        if over_ep is None:
            return pieces
        (start, _), = over_ep.runs[self._mesh.coordinate(self._rank)["ep"]]
        return [((o[0] + start, *o[1:]), v) for o, v in pieces]

    @property
    def _plan_ctx(self):
        """The ``PlanContext`` of the first program (every later one places weights the same)."""
        return self._plans[0][1]

    def _owner(self, target: str) -> int:
        """The pipeline rank whose copy of ``target`` counts (the first stage holding it)."""
        slot = self._plan_ctx.expert_slot(target)
        target = slot[0] if slot else target  # stages name the experts of ep rank 0
        stages = self._plans[0][1].pipeline.stages
        ranks = [s.rank for s in stages if target in s.params]
        return min(ranks) if ranks else 0

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, not this rank's shards.

        Sharded gradients contribute from every tp rank, replicated ones once, a parameter held by
        several pipeline stages once, so every rank gets the same norm and the same scale (clipping
        each rank's shards by their own norm would scale replicated weights differently on each
        rank). A collective: call it on every rank.
        """
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        inf = norm_type == float("inf")
        pp, tp = self._pp_rank, self._mesh.coordinate(self._rank)["tp"]

        def reduce(gs):
            if not gs:
                return torch.zeros((), dtype=torch.float64, device=self._device)
            if inf:
                return torch.stack([g.detach().abs().max().double() for g in gs]).max()
            return torch.stack([g.detach().double().abs().pow(norm_type).sum() for g in gs]).sum()

        counted = [(n, g) for n, g in grads if self._owner(self._captured.graph_name(n)) == pp]
        ctx = self._plan_ctx

        def norm_of(part):  # over the tp ranks: shards add up, replicated gradients count once
            sharded = [_counted_once(g, self.placement_of(n), tp) for n, g in part
                       if isinstance(self.placement_of(n), Shard)]
            sharded = self._combine(reduce(sharded), "tp", inf)
            whole = reduce([g for n, g in part if not isinstance(self.placement_of(n), Shard)])
            return torch.maximum(sharded, whole) if inf else sharded + whole

        experts = [(n, g) for n, g in counted if ctx.is_expert(self._captured.graph_name(n))]
        dense = [(n, g) for n, g in counted if not ctx.is_expert(self._captured.graph_name(n))]
        total, mine = norm_of(dense), self._combine(norm_of(experts), "ep", inf)  # each ep rank its experts
        total = torch.maximum(total, mine) if inf else total + mine
        total = self._combine(total, "pp", inf)
        norm = total if inf else total ** (1.0 / norm_type)
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for _, g in grads:
                g.mul_(coef)
        return norm.float()

    def _combine(self, x: torch.Tensor, dim: str, inf: bool) -> torch.Tensor:
        comm = self._comms[dim]
        if comm.world == 1:
            return x
        parts = torch.cat(comm.all_gather(x.reshape(1)))
        return parts.max() if inf else parts.sum()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's state dict (original names, full tensors) on every rank.

        A collective: every rank must call it.
        """
        cap = self._captured
        local = self.state_dict()
        pp = self._pp_rank
        out = {}
        for key in sorted(set(a for names in cap.aliases.values() for a in names) | set(local)):
            target = cap.graph_name(key)
            template = cap.tensors.get(cap.aliases.get(key, [key])[0])
            if template is None or (key not in local and not _persistent(cap, key)):
                continue
            place = self.placement_of(key)
            over_ep = self._plan_ctx.expert_shards.get(target)
            if key in local:
                t = local[key].detach()
            else:
                shape = template.shape if over_ep is None else local_shape(template.shape, over_ep)
                t = torch.zeros(local_shape(shape, place), dtype=template.dtype, device=self._device)
            if isinstance(place, Shard) and self._comm.world > 1:
                t = _assemble(self._comm.all_gather(t.contiguous()), place, _full(t, place))
            t = self._whole_over_ep(t, target, key in local)
            if self._comms["pp"].world > 1:
                mine = t if self._owner(target) == pp else torch.zeros_like(t)
                t = self._comms["pp"].all_reduce(mine.to(torch.uint8) if mine.dtype == torch.bool else mine).to(t.dtype)
            out[key] = t.clone()
        return out

    def _whole_over_ep(self, t: torch.Tensor, target: str, held: bool) -> torch.Tensor:
        """A tensor whole on this ep rank (after tp): the ep ranks' experts of a stacked weight
        joined, an expert module's weight from the ep rank holding it (a collective over ep)."""
        comm, ctx = self._comms["ep"], self._plan_ctx
        if comm.world == 1:
            return t
        over_ep = ctx.expert_shards.get(target)
        if over_ep is not None:
            return _assemble(comm.all_gather(t.contiguous()), over_ep, _full(t, over_ep))
        if ctx.expert_slot(target) is not None:
            mine = t if held else torch.zeros_like(t)
            return comm.all_reduce(mine.to(torch.uint8) if mine.dtype == torch.bool else mine).to(t.dtype)
        return t

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's random-number states: torch's default generator (and the CUDA device's,
        on a GPU) and fxpar's own dropout streams, each as ``Generator.get_state()`` gives it.
        ``fxpar.save`` stores them for every rank and ``fxpar.load`` puts them back, so that a
        resumed run draws the dropout masks (and the data, where it is drawn from torch's default
        generator) of an uninterrupted one."""
        out = {"torch": torch.get_rng_state()}
        if self._device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self._device)
        for name in _STREAMS:
            gen = getattr(self._ctx.rng, name)
            if gen is not None:
                out[name] = gen.get_state()
        return out

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        """Put back what ``rng_state`` returned on this rank (of a module on the same mesh)."""
        for name, state in states.items():
            if name == "torch":
                torch.set_rng_state(state)
            elif name == "cuda":
                torch.cuda.set_rng_state(state, self._device)
            elif name in _STREAMS and getattr(self._ctx.rng, name) is not None:
                getattr(self._ctx.rng, name).set_state(state)
            else:
                raise FxparError(f"set_rng_state: this rank has no random stream {name!r}")

    @property
    def device(self) -> torch.device:
        """Where this rank's shards and programs live."""
        return self._device

    @property
    def timeout(self) -> datetime.timedelta:
        """How long every collective of this module waits for the other ranks."""
        return self._p2p.timeout

    def save_trace(self, path: str) -> None:
        """Write the last step's actions of every rank as a Chrome trace (open it in Perfetto or
        chrome://tracing): one row per rank, one box per compute, send and receive. A collective:
        every rank must call it; rank 0 writes the file."""
        prog = self.__dict__.get("_last")
        events = [(self._rank, name, t0, t1) for name, t0, t1 in prog.runner.events] if prog else []
        gathered = [None] * dist.get_world_size() if dist.is_initialized() else [events]
        if dist.is_initialized():
            dist.all_gather_object(gathered, events)
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            write_chrome_trace(path, [e for part in gathered for e in part])

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def plans(self):
        """``(graph, PlanContext)`` of every program built so far (for inspection)."""
        return list(self._plans)

    def comm_bytes(self) -> dict:
        """Bytes this rank has sent, by collective kind (and pipeline sends), since the last
        ``reset_comm_bytes``."""
        out: dict = {}
        for dim, comm in self._comms.items():
            for kind, n in comm.sent_bytes.items():
                key = kind if dim == "tp" else f"{dim} {kind}"
                if n:
                    out[key] = out.get(key, 0) + n
        if self._p2p.sent_bytes:
            out["pipeline send"] = self._p2p.sent_bytes
        return out

    def routed_tokens(self) -> dict[str, list[int]]:
        """Per mixture-of-experts layer split over ep, the rows (routed token slots, from every
        ep rank) each of this rank's experts got in the last forward; empty without ep."""
        return {layer: list(rows) for layer, rows in self._ctx.routed.items()}

    def reset_comm_bytes(self) -> None:
        for comm in self._comms.values():
            comm.reset_counters()
        self._p2p.sent_bytes = 0

    def extra_repr(self) -> str:
        return f"{self._mesh}, rank {self._rank}, device {self._device}"


def _reraise(error) -> None:
    if error is not None:
        raise error


def _everyone(mesh: Mesh, timeout, device, plain: bool) -> Group:
    """The ranks that check they agree: the whole world (a ``Mesh`` must cover it; the checks of
    a torch ``DeviceMesh`` over part of the world are skipped, with a warning)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return Group(LocalComm(), device)
    if world != mesh.size and not plain:
        warnings.warn(f"fxpar: the DeviceMesh covers {mesh.size} of the {world} ranks; the checks that ranks agree "
                      "on their model, options and inputs are skipped", stacklevel=4)
        return Group(LocalComm(), device)
    return Group(DistComm(dist.group.WORLD, timeout, "world"), device)


_STREAMS = ("replicated", "sharded", "context", "context_sharded")  # fxpar's dropout generators


def _training(pm) -> bool:
    return pm.training and torch.is_grad_enabled()


def _persistent(cap, key) -> bool:
    return cap.persistent.get(key, True)


def _compile_options(option) -> dict | None:
    """``compile=True`` or a dict of ``torch.compile`` arguments -> those arguments."""
    if option is False or option is None:
        return None
    if option is True:
        return {}
    if isinstance(option, dict):
        return dict(option)
    raise FxparError(f"compile= takes True, False or a dict of torch.compile arguments, not {option!r}")


def _as_tuple(args):
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _full(local, place):
    shape = list(local.shape)
    shape[place.dim] = place.size
    return shape


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dynamic_dims(cap) -> dict[int, tuple[int, ...]]:
    """For the k-th tensor input, the dims captured as symbolic."""
    out = {}
    tensors = [n.meta["val"] for n in cap.gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    for k, v in enumerate(tensors):
        dims = tuple(d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt))
        if dims:
            out[k] = dims
    return out


def write_chrome_trace(path: str, events) -> None:
    """``events``: ``(rank, name, start, end)`` in seconds. Compute actions are one colour, sends
    and receives another."""
    import json

    t0 = min(e[2] for e in events) if events else 0.0
    trace = [
        {"name": name, "ph": "X", "pid": 0, "tid": rank, "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6,
         "cat": "compute" if name[0] in "FB" else "comm"}
        for rank, name, a, b in events
    ]
    trace += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}} for r in sorted({e[0] for e in events})]
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)


def _counted_once(g: torch.Tensor, place: Shard, rank: int) -> torch.Tensor:
    """``g`` with zeros where a lower tp rank holds the same rows (shared key/value heads), so
    that a sum over the ranks counts every element once."""
    if not place.has_duplicates:
        return g
    keep = torch.as_tensor(place.primary(rank), device=g.device)
    shape = [1] * g.dim()
    shape[place.dim] = -1
    return g * keep.view(shape).to(g.dtype)
