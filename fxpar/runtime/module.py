"""``ParallelModule``: what ``fxpar.parallelize`` returns on each rank.

It holds only this rank's shards, registered under the model's original names, and runs the
rank's generated program. Programs are made per input signature (shapes that are not dynamic,
dtypes, train/eval mode), like ``torch.compile`` recompiles; all of them share the same
parameters, and a new signature must place parameters the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..capture import capture, meta_skeleton
from ..codegen import build_module, get_path, rank_graph
from ..errors import FxparError, MeshError
from ..holder import populate, retarget_submodules
from ..mesh import DEFAULT_TIMEOUT, Mesh, as_mesh
from ..placement import REPLICATE, Shard
from ..plan import plan_graph
from ..simulate import SHARDED_SEED_OFFSET
from .collectives import _assemble
from .comm import DistComm, LocalComm
from .context import RankContext, RNGStreams, running


class ParallelModule(nn.Module):
    """One rank's share of a model, trained and run like the model itself.

    ``parameters()`` are the local shards (hand them to any optimizer), ``state_dict()`` is local
    under the original names, ``full_state_dict()`` gathers every full tensor on every rank.
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
        dynamic_shapes=None,
        overrides=None,
        rng: str = "megatron",
        device=None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        seed: int = 0,
        init_fn=None,
    ):
        super().__init__()
        plain = as_mesh(mesh)
        if plain.pp > 1 or plain.dp > 1:
            raise MeshError(f"{plain}: fxpar.parallelize runs tensor parallelism; use dp=1 and pp=1 for now")
        device = torch.device(device) if device is not None else _default_device()
        device_mesh = plain.bind(device.type, timeout) if isinstance(mesh, Mesh) else mesh
        tp_group = device_mesh.get_group("tp")
        comm = DistComm(tp_group, timeout) if plain.tp > 1 else LocalComm()
        # Megatron's tensor-parallel stream: the user's seed, offset per tp rank
        sharded = torch.Generator(device=device).manual_seed(torch.initial_seed() + SHARDED_SEED_OFFSET + comm.rank)
        self.training = model.training
        # plain attributes, not submodules: they must not show in parameters() or state_dict()
        self.__dict__.update(
            _mesh=plain,
            _device=device,
            _comm=comm,
            _ctx=RankContext(rank=comm.rank, comms={"tp": comm}, rng=RNGStreams(None, sharded, rng == "exact")),
            _skeleton=meta_skeleton(model),
            _source=model,
            _options=dict(dynamic_shapes=dynamic_shapes, overrides=overrides, rng=rng),
            _seed=seed,
            _init_fn=init_fn,
            _programs={},
            _plans=[],
            _placements=None,
            _captured=None,
            _dynamic=None,
        )
        if example_args is not None or example_kwargs:
            self._program(_as_tuple(example_args), dict(example_kwargs or {}))

    # running -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        prog = self._program(args, kwargs)
        with running(self._ctx):
            return prog(*args, **kwargs)

    def _program(self, args, kwargs):
        prog = self._programs.get(self._key(args, kwargs))
        if prog is None:
            prog = self._build(args, kwargs)
            # keyed after building: the first capture tells which dims are symbolic
            self._programs[self._key(args, kwargs)] = prog
        return prog

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

    def _build(self, args, kwargs):
        self._skeleton.train(self.training)
        cap = capture(self._skeleton, args, kwargs, dynamic_shapes=self._options["dynamic_shapes"])
        gm, ctx = plan_graph(cap, self._mesh, overrides=self._options["overrides"], rng=self._options["rng"])
        if self._placements is None:
            self._check_same_model(cap)
            populate(self, cap, ctx.param_placements, self._comm.rank, self._source, self._device, seed=self._seed, init_fn=self._init_fn)
            self.__dict__.update(_placements=dict(ctx.param_placements), _captured=cap, _source=None, _dynamic=_dynamic_dims(cap))
            self._check_rng(gm)
        elif any(ctx.param_placements.get(k, REPLICATE) != v for k, v in self._placements.items()):
            raise FxparError(
                "these inputs lead to a different placement of the parameters than the first call; "
                "parallelize a separate module for them"
            )
        for w in ctx.warnings:
            warnings.warn(f"fxpar: {w}", stacklevel=3)
        graph = rank_graph(gm, self._comm.rank, self._device)
        prog = build_module(self, graph, cap.gm, f"Rank{self._comm.rank}", retarget_submodules(cap.gm, self._device))
        self._plans.append((gm, ctx))
        return prog

    def _check_same_model(self, cap) -> None:
        """Each rank slices its own copy of the model: the copies must be the same model."""
        if self._comm.world == 1 or self._source is None:
            return
        sums = []
        for name in cap.tensors:
            t = get_path(self._source, name)
            if t.device.type != "meta" and t.is_floating_point():
                sums.append(t.detach().double().sum())
        if not sums:
            return
        mine = torch.stack(sums).to(self._device)
        theirs = self._comm.all_gather(mine)
        if any(not torch.equal(t, mine) for t in theirs):
            bad = next(i for i in range(len(sums)) if any(t[i] != mine[i] for t in theirs))
            raise FxparError(
                f"tensor-parallel ranks hold different values for '{list(cap.tensors)[bad]}' (and maybe more): "
                "build the model with the same seed on every rank (torch.manual_seed) or load the same weights"
            )

    def _check_rng(self, gm) -> None:
        """Replicated dropout needs the same random state on every tp rank: warn if it is not."""
        from .ops import dropout

        if self._comm.world == 1 or not any(n.target is dropout and n.args[1] for n in gm.graph.nodes):
            return
        gen = torch.cuda.default_generators[self._device.index or 0] if self._device.type == "cuda" else torch.default_generator
        digest = hashlib.sha1(gen.get_state().numpy().tobytes()).digest()[:8]
        mine = torch.tensor(list(digest), dtype=torch.int64, device=self._device)
        states = self._comm.all_gather(mine)
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._placements is not None:  # before the first call there is nothing to zero
            super().zero_grad(set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, not this rank's shards.

        Sharded gradients contribute from every rank, replicated ones once, so every rank gets
        the same norm and the same scale (clipping each rank's shards by their own norm would
        scale replicated weights differently on each rank). A collective: call it on every rank.
        """
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self._device)
        sharded = [g for n, g in grads if isinstance(self.placement_of(n), Shard)]
        whole = [g for n, g in grads if not isinstance(self.placement_of(n), Shard)]
        inf = norm_type == float("inf")

        def reduce(gs):
            if not gs:
                return torch.zeros((), dtype=torch.float64, device=self._device)
            if inf:
                return torch.stack([g.detach().abs().max().double() for g in gs]).max()
            return torch.stack([g.detach().double().abs().pow(norm_type).sum() for g in gs]).sum()

        local, rep = reduce(sharded), reduce(whole)
        if self._comm.world > 1:
            parts = self._comm.all_gather(local.reshape(1))
            local = torch.cat(parts).max() if inf else torch.cat(parts).sum()
        total = torch.maximum(local, rep) if inf else (local + rep) ** (1.0 / norm_type)
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            for _, g in grads:
                g.mul_(coef)
        return total.float()

    def parameters(self, recurse: bool = True):
        self._require_built()
        return super().parameters(recurse)

    def placement_of(self, name: str):
        """Placement of a parameter or buffer on the tp dimension."""
        return self._placements.get(self._captured.graph_name(name), REPLICATE)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's state dict (original names, full tensors) on every rank.

        A collective: every rank of the tp group must call it.
        """
        out = {}
        for key, local in self.state_dict().items():
            place = self.placement_of(key)
            if isinstance(place, Shard) and self._comm.world > 1:
                parts = self._comm.all_gather(local.detach().contiguous())
                out[key] = _assemble(parts, place, _full(local, place))
            else:
                out[key] = local.detach().clone()
        return out

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def plans(self):
        """``(graph, PlanContext)`` of every program built so far (for inspection)."""
        return list(self._plans)

    def comm_bytes(self) -> dict:
        """Bytes this rank has sent, by collective kind, since the last ``reset_comm_bytes``."""
        return dict(self._comm.sent_bytes)

    def reset_comm_bytes(self) -> None:
        self._comm.reset_counters()

    def extra_repr(self) -> str:
        return f"{self._mesh}, rank {self._comm.rank}, device {self._device}"


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
