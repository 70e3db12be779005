"""``ParallelModule``: what ``fxpar.parallelize`` returns on each rank.

It holds only this rank's shards (of its pipeline stages) under the model's original names and
runs the rank's programs, made per input signature (``runtime/programs.py``). Here: the options
checked, the binding to the mesh (``runtime/binding.py``), running, and the public queries, each
a call into the shard geometry (``fxpar/geometry.py``), ``runtime/clipping.py``,
``runtime/state.py`` or ``runtime/telemetry.py``.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..autocast import autocast_of, outside_autocast
from ..capture import TARGET, meta_skeleton
from ..errors import FxparError, OptionError
from ..geometry import ShardGeometry
from ..memory import expr
from ..mesh import Mesh, as_mesh, ensure_process_group
from ..ops.context import running
from ..options import PlanOptions, check_inputs_mode, plain as plain_data, timeout as as_timeout
from . import state, telemetry
from .agree import agree, agree_on_failure
from .batches import microbatches, target_microbatches
from .binding import bind, everyone as everyone_of
from .checks import (
    callable_name, check_loss_call, explain_options, explain_structure, explain_values, model_structure, model_values,
)
from .clipping import clip_grad_norm_
from .generate import generate
from .pipeline import join_microbatches, microbatch_size, split_microbatches
from .programs import FORWARD, Programs
from .scaling import LossScaler
from .telemetry import write_chrome_trace  # noqa: F401 - importable from here, as it always was


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
            if compile_options is not None and plan_options.schedule in ("zbh1", "zbv") and plain.pp > 1:
                raise OptionError(f"schedule={plan_options.schedule!r} runs weight gradients apart from the rest of "
                                  "backward, which torch.compile's graphs cannot: use schedule='1f1b' or "
                                  "'interleaved' with compile, or leave compile out")
            refused = None
        except FxparError as e:
            if not dist.is_initialized():  # no peers to tell yet
                raise
            refused, timeout = e, None
        wait = timeout or as_timeout(None, fallback=True)
        if isinstance(mesh, Mesh):
            ensure_process_group(device.type, wait)
        everyone = everyone_of(plain, wait, device, isinstance(mesh, Mesh))
        agree_on_failure(everyone, lambda: _reraise(refused), "to take the options of fxpar.parallelize")
        # the mesh and the options agree before any process group is made for the mesh
        agree(everyone, {
            "mesh": repr(plain), **plan_options.summary(), "dynamic_shapes": plain_data(dynamic_shapes),
            "seed": seed, "loss_fn": callable_name(loss_fn), "init_fn": callable_name(init_fn),
            "compile": plain_data(compile_options), "check_inputs": check_inputs, "device": device.type,
            "example_target": example_target is not None, "timeout": timeout.total_seconds(),
        }, explain_options)
        bound = bind(mesh, plain, device, timeout, rng == "exact")
        self.training = model.training
        programs = Programs(self, bound, everyone, skeleton=meta_skeleton(model), source=model, loss_fn=loss_fn,
                            options=plan_options, dynamic_shapes=dynamic_shapes, seed=seed, init_fn=init_fn,
                            compile_options=compile_options, check_mode=check_inputs, device=device)
        # plain attributes, not submodules: they must not show in parameters() or state_dict()
        self.__dict__.update(
            _mesh=plain,
            _rank=bound.rank,
            _device=device,
            _comms=bound.comms,
            _ctx=bound.ctx,
            _p2p=bound.p2p,
            _loss_fn=loss_fn,
            _microbatches=plan_options.microbatches,
            _cache=programs,
            _programs=programs.programs,
            _scaler=LossScaler() if plan_options.precision == "fp16" else None,
        )
        agree(everyone, model_structure(model), explain_structure)
        agree(everyone, model_values(model), explain_values)
        args, built = _as_tuple(example_args), None
        if example_target is not None and loss_fn is not None:
            # the training graph decides how the weights are split (it knows what the loss reads)
            with_target = {**(example_kwargs or {}), TARGET: example_target}
            programs.check_call(args, with_target, self.training)
            built = programs.loss_program(args, with_target, self.training)
        if built is None and (example_args is not None or example_kwargs):
            programs.check_call(args, dict(example_kwargs or {}), self.training)
            programs.get(args, dict(example_kwargs or {}), self.training)

    # running -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self._run(FORWARD, args, kwargs)

    def _run(self, entry: str, args, kwargs):
        """Run the program of ``entry`` (the model's forward, or another: ``Programs.add_entry``)."""
        self._cache.check_call(args, kwargs, self.training, entry)
        prog = self._cache.get(args, kwargs, self.training, entry=entry)
        with running(self._ctx), outside_autocast(autocast_of(args, kwargs)):
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
            mbs = microbatches(prog.captured, args, kwargs, self._microbatches)
            self.__dict__["_last"] = prog
            return self._everywhere(prog, mbs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, seed: int = 0) -> torch.Tensor:
        """Continue each prompt of ``input_ids`` ``(batch, length)`` by up to ``max_new_tokens``
        tokens with the model's key/value cache; returns the prompts and the new tokens, as
        Hugging Face's ``generate`` does. Greedy by default; ``do_sample=True`` draws after
        ``temperature``, ``top_k`` and ``top_p``, from a generator seeded with ``seed`` on every
        rank (every rank draws the same). A sequence that makes ``eos_token_id`` (an id or a list)
        is filled with ``pad_token_id`` (default: the eos id) from then on; generation stops when
        all have. Both default to a Hugging Face model's ``generation_config``, as its own
        ``generate`` does. Prompts of different lengths are left-padded, as ``attention_mask`` says (models
        whose forward takes a mask: Hugging Face's).

        The prompt runs as one program and every new token as another, each captured once
        (``fxpar/runtime/generate.py``). A Hugging Face model needs nothing more; a model that
        keeps its own cache takes positions as gpt-fast's do. Call it alike on every rank::

            pm = fxpar.parallelize(hf_model.eval(), fxpar.Mesh(tp=2))
            tokens = pm.generate(input_ids, attention_mask=mask, max_new_tokens=32)

            model.setup_caches(max_batch_size=4, max_seq_len=256)   # fxpar.models.llama, gpt-fast
            pm = fxpar.parallelize(model.eval(), fxpar.Mesh(tp=2))
            tokens = pm.generate(prompts, max_new_tokens=32)
        """
        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                        eos_token_id, pad_token_id, seed)

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
        self._cache.check_call(args, with_target, self.training)  # with or without a target, on every rank alike
        check_loss_call(self._loss_fn, target)
        m = self._microbatches
        prog = self._cache.loss_program(args, with_target, self.training)
        if prog is not None:
            mbs = microbatches(prog.captured, args, with_target, m)
            targets, loss_fn = None, None
        else:
            prog = self._cache.get(args, kwargs, self.training, inputs=with_target)
            mbs = microbatches(prog.captured, args, kwargs, m)
            targets, loss_fn = target_microbatches(target, m), self._loss_fn
        self.__dict__["_last"] = prog
        with running(self._ctx), outside_autocast(autocast_of(args, kwargs)):
            return prog.runner.train_step(mbs, targets, loss_fn, prog.params, self._scaler)

    def _everywhere(self, prog, mbs):
        """Pipelined inference, the output given to every rank of the pipeline."""
        outs = prog.runner.forward(mbs)
        comm = self._comms["pp"]
        last = prog.schedule.stage_rank[-1] == self._mesh.coordinate(self._rank)["pp"]
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

    @property
    def loss_scaler(self) -> LossScaler | None:
        """Under ``precision="fp16"``, the dynamic loss scaling of ``train_step``
        (``runtime/scaling.py``): ``.scale``, ``.skipped`` steps, ``.last_skipped``. None otherwise."""
        return self._scaler

    # parameters and state ----------------------------------------------------------------------
    @property
    def geometry(self) -> ShardGeometry:
        """Where every parameter and buffer lies over the mesh: which rank holds which box of it
        (``fxpar.geometry.ShardGeometry``; ranks as ``pm.rank`` counts them). Made with the
        parameters, at the first call."""
        return self._require_built()

    def _require_built(self) -> ShardGeometry:
        if self._cache.geometry is None:
            raise FxparError(
                "this ParallelModule has not been built yet: its parameter shards are made at the first "
                "call (or pass example_args to fxpar.parallelize); create the optimizer after that"
            )
        return self._cache.geometry

    @property
    def rank(self) -> int:
        """This process's position on the mesh (``pm.mesh.coordinate(pm.rank)`` gives its coordinates)."""
        return self._rank

    def named_parameters(self, *args, **kwargs):
        self._require_built()
        return super().named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        self._require_built()
        return super().parameters(recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._cache.geometry is not None:  # before the first call there is nothing to zero
            super().zero_grad(set_to_none)

    def placement_of(self, name: str):
        """Placement of a parameter or buffer on the tp dimension (for an expert split over ep,
        of this ep rank's part of it: see ``local_shard``)."""
        return self.geometry.placement(name)

    def local_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``, a whole value of parameter or buffer ``name`` (its
        gradient, a checkpoint's tensor): the ep rank's experts of a stacked expert weight, then
        the tp rank's slice. An expert module's weight that another ep rank holds: ``None``."""
        return self.geometry.local_shard(name, full, self._rank)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, not this rank's shards.

        Sharded gradients contribute from every tp rank, replicated ones once, a parameter held by
        several pipeline stages once, so every rank gets the same norm and the same scale (clipping
        each rank's shards by their own norm would scale replicated weights differently on each
        rank). A collective: call it on every rank.
        """
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        return clip_grad_norm_(grads, self.geometry, self._rank, self._comms, self._device, max_norm, norm_type)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's state dict (original names, full tensors) on every rank.

        A collective: every rank must call it.
        """
        return state.full_state_dict(self.state_dict(), self.geometry, self._rank, self._comms, self._device)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's random-number states: torch's default generator (and the CUDA device's,
        on a GPU) and fxpar's own dropout streams, each as ``Generator.get_state()`` gives it.
        ``fxpar.save`` stores them for every rank and ``fxpar.load`` puts them back, so that a
        resumed run draws the dropout masks (and the data, where it is drawn from torch's default
        generator) of an uninterrupted one."""
        return state.rng_state(self._ctx.rng, self._device)

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        """Put back what ``rng_state`` returned on this rank (of a module on the same mesh)."""
        state.set_rng_state(self._ctx.rng, self._device, states)

    @property
    def device(self) -> torch.device:
        """Where this rank's shards and programs live."""
        return self._device

    @property
    def timeout(self) -> datetime.timedelta:
        """How long every collective of this module waits for the other ranks."""
        return self._p2p.timeout

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def plans(self):
        """``(graph, PlanContext)`` of every program built so far (for inspection)."""
        return list(self._cache.plans)

    # telemetry ---------------------------------------------------------------------------------
    def save_trace(self, path: str) -> None:
        """Write the last step's actions of every rank as a Chrome trace (open it in Perfetto or
        chrome://tracing): one row per rank, one box per compute, send and receive. A collective:
        every rank must call it; rank 0 writes the file."""
        telemetry.save_trace(path, telemetry.rank_events(self._rank, self.__dict__.get("_last")))

    def step_events(self) -> list[tuple[str, float, float]]:
        """This rank's actions in its last pipelined step, in order, as ``(action, start, end)``
        (``time.perf_counter`` seconds): ``"F0.1"``, ``"RECV_B0.1<-1"``, ``"W0.1"``, ... Idle time
        is what lies between them; empty before a pipelined step."""
        prog = self.__dict__.get("_last")
        return list(prog.runner.events) if prog is not None else []

    def comm_bytes(self) -> dict:
        """Bytes this rank has sent, by collective kind (and pipeline sends), since the last
        ``reset_comm_bytes``."""
        return telemetry.comm_bytes(self._comms, self._p2p)

    def routed_tokens(self) -> dict[str, list[int]]:
        """Per mixture-of-experts layer split over ep, the rows (routed token slots, from every
        ep rank) each of this rank's experts got in the last forward; empty without ep."""
        return telemetry.routed_rows(self._ctx)

    def reset_comm_bytes(self) -> None:
        telemetry.reset_comm_bytes(self._comms, self._p2p)

    def extra_repr(self) -> str:
        return f"{self._mesh}, rank {self._rank}, device {self._device}"


def _reraise(error) -> None:
    if error is not None:
        raise error


def _training(pm) -> bool:
    return pm.training and torch.is_grad_enabled()


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


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
