"""Running one rank's pipeline stages under a lowered schedule.

Every action of the schedule is carried out literally: ``RECV_F``/``RECV_B`` wait for the values
or gradients of one microbatch from one stage, ``F``/``B`` run a stage's forward or backward,
``W`` the weight gradients a zero-bubble schedule's B left (``fxpar/ops/deferred.py``),
``SEND_F``/``SEND_B`` send without waiting. Values keep the placement they have in the global plan,
so with tensor parallelism inside a stage each tp rank exchanges its own local piece with its
counterpart. After the last action: gradients of parameters held by several stages (a tied
embedding and output projection) are summed over them, data-parallel replicas average their
gradients (bucketed all-reduces), and the mean loss is given to every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..errors import FxparError
from ..schedule import Schedule
from ..stages import PipelineSpec
from ..ops.context import current, tracing
from ..ops.params import one_step
from ..ops import deferred
from .buckets import buckets
from .overlap import ReduceWhileBackward
from .zero import finish as finish_rows



@dataclass
class Value:
    """A value crossing between stages, as one rank holds it."""

    shape: tuple
    dtype: torch.dtype
    grad: bool  # whether its gradient travels back


class PipelineRunner:
    """One rank's stages (``modules``, by stage index) under a lowered ``schedule``; ``peer(j)`` is
    the global rank holding stage ``j`` at this rank's data-parallel and tp position."""

    def __init__(
        self,
        spec: PipelineSpec,
        schedule: Schedule,
        modules: dict,
        pp_rank: int,
        peer,
        values: dict[str, Value],
        out_spec,
        device,
        p2p,
        tied_shapes: dict | None = None,
        input_shapes: list | None = None,
    ):
        self.spec, self.schedule, self.modules = spec, schedule, modules
        self.pp_rank, self.peer, self.values = pp_rank, peer, values
        self.out_spec, self.device, self.p2p = out_spec, device, p2p
        self.tied_shapes = tied_shapes or {}
        self.input_shapes = input_shapes or []
        self.sizes: dict = {}  # values of the symbolic sizes in this step
        self.events: list[tuple[str, float, float]] = []  # (action, start, end) of the last step, seconds
        self.last = len(spec.stages) - 1
        self.deferring = schedule.splits_backward  # B leaves weight gradients for W
        self.vid = {name: i for i, name in enumerate(sorted(values))}
        self.experts: set[str] = set()  # parameters split over the ep ranks (not replicated there)
        self.split: set[str] = set()  # parameters held as rows over the dp ranks (zero)
        self.overlap = False  # data-parallel all-reduces begun during backward (fxpar/runtime/overlap.py)
        self._reducer = None

    # one training step ------------------------------------------------------------------------
    def train_step(self, microbatches: list[list], targets: list | None, loss_fn, params, scaler=None) -> torch.Tensor:
        """Forward, loss and backward of every microbatch; ``loss_fn=None`` when the stages' graph
        computes the loss itself (its last stage's output). ``scaler``: a ``LossScaler`` that
        scales the loss and unscales the gradients (``precision="fp16"``)."""
        if not torch.is_grad_enabled():
            raise FxparError("train_step computes gradients: call it outside torch.no_grad()")
        m = len(microbatches)
        if scaler is not None:
            scaler.check_fresh(params.values())
        st = _State(microbatches, targets, loss_fn, m, training=True, scale=scaler.scale if scaler else 1.0)
        self._bind_sizes(microbatches[0])
        before = {n: params[n].grad.clone() for n in self.spec.tied if n in params and params[n].grad is not None}
        self._expect(lambda r: self.schedule.actions[r])
        reducer = self._overlapping(params)
        if reducer is not None:
            reducer.begin_step()
        with tracing() as background, one_step(background=self.overlap):
            self._run(self.schedule.actions[self.pp_rank], st)
        self.events += background
        self.p2p.flush()
        reduced = reducer.finish() if reducer is not None else set()
        if reducer is not None:
            self.events += reducer.events
        if self.split:
            finish_rows({n: params[n] for n in self.split}, current().comms)
        self._sync_tied(params, before)
        self._sync_data_parallel(params, reduced)
        if scaler is not None:
            scaler.unscale_([params[n] for n in sorted(params)], current().comms, self.device)
        loss = sum(st.losses) / m if st.losses else torch.zeros((), device=self.device)
        return self._everywhere(loss.detach().reshape(()).float())

    def forward(self, microbatches: list[list]) -> list[list]:
        """Inference: forwards only. On the rank of the last stage, each microbatch's output
        leaves (flat, in the order of the model's output structure); elsewhere nothing."""
        st = _State(microbatches, None, None, len(microbatches))
        self._bind_sizes(microbatches[0])
        self._expect(lambda r: self._forward_actions(len(microbatches), r))
        with tracing() as background:
            self._run(self._forward_actions(len(microbatches)), st)
        self.events += background
        self.p2p.flush()
        return st.outputs

    def _run(self, actions, st) -> None:
        """Carry out ``actions`` in order, keeping when each started and ended (``events``)."""
        self.events = []
        clock = time.perf_counter
        for a in actions:
            t0 = clock()
            getattr(self, "_" + a.kind.lower())(a, st)
            self.events.append((str(a), t0, clock()))

    def _expect(self, actions_of) -> None:
        """Tell the transport, per peer, the messages that peer will send here, in its order.

        NCCL matches a pair's point-to-point messages in posting order and ignores tags; posting
        the receives in the sender's order keeps them matched even when this rank needs them in
        another order (a value skipping a stage, interleaved stages)."""
        for r in range(self.schedule.ranks):
            if r == self.pp_rank:
                continue
            msgs = []
            for a in actions_of(r):
                if a.kind not in ("SEND_F", "SEND_B") or self.schedule.stage_rank[a.peer] != self.pp_rank:
                    continue
                s = self.spec.stages[a.stage]
                if a.kind == "SEND_F":
                    names = [n for n in s.outputs if a.peer in s.sinks[n]]
                else:
                    names = [n for n in s.inputs if s.sources[n] == a.peer and self.values[n].grad]
                kind = a.kind[-1]
                msgs += [(self._tag(kind, a.mb, n), self._shape(self.values[n]), self.values[n].dtype) for n in names]
            self.p2p.expect(self.peer(self._any_stage_of(r)), msgs, self.device)

    def _any_stage_of(self, rank: int) -> int:
        return self.schedule.stage_rank.index(rank)

    def _forward_actions(self, m: int, rank: int | None = None):
        from ..schedule import Action, lower

        rank = self.pp_rank if rank is None else rank
        mine = [j for j, r in enumerate(self.schedule.stage_rank) if r == rank]
        compute = [[Action("F", j, mb) for mb in range(m) for j in range(len(self.schedule.stage_rank))
                    if self.schedule.stage_rank[j] == r] for r in range(self.schedule.ranks)]
        plain = Schedule("forward", compute, list(self.schedule.stage_rank), m)
        acts = lower(plain, self.spec.links()).actions[rank]
        return [a for a in acts if a.kind in ("F", "SEND_F", "RECV_F") and a.stage in mine]

    def _bind_sizes(self, inputs: list) -> None:
        """Values of the symbolic sizes, read off one microbatch's inputs."""
        self.sizes = {}
        for shape, x in zip(self.input_shapes, inputs):
            if shape is None or not isinstance(x, torch.Tensor):
                continue
            for d, n in zip(shape, x.shape):
                if not isinstance(d, int):
                    self.sizes[d] = n

    def _shape(self, v: Value) -> tuple:
        return tuple(d if isinstance(d, int) else int(d.subs(self.sizes)) for d in v.shape)

    # actions ----------------------------------------------------------------------------------
    def _tag(self, kind: str, mb: int, name: str) -> int:
        return ((mb * len(self.vid) + self.vid[name]) * 2 + (kind == "B")) % (1 << 30)

    def _recv_f(self, a, st):
        s = self.spec.stages[a.stage]
        for name in s.inputs:
            if s.sources[name] == a.peer:
                v = self.values[name]
                t = self.p2p.recv(self._shape(v), v.dtype, self.device, self.peer(a.peer), self._tag("F", a.mb, name))
                st.recv[(a.stage, a.mb)][name] = t.requires_grad_(v.grad and torch.is_grad_enabled())

    def _send_f(self, a, st):
        s = self.spec.stages[a.stage]
        out = st.out[(a.stage, a.mb)]
        for name in s.outputs:  # in the order the peer expects them (``_expect``)
            if a.peer in s.sinks[name]:
                self.p2p.send(out[name], self.peer(a.peer), self._tag("F", a.mb, name))

    def _f(self, a, st):
        s = self.spec.stages[a.stage]
        received = st.recv[(a.stage, a.mb)]
        ins = []
        for name in s.inputs:
            if name not in received:  # made by a stage on this rank: hand it over
                t = st.out[(s.sources[name], a.mb)][name].detach()
                received[name] = t.requires_grad_(self.values[name].grad and torch.is_grad_enabled())
            ins.append(received[name])
        if self.deferring and st.training:
            with deferred.collecting(st.jobs.setdefault((a.stage, a.mb), [])):
                outs = self.modules[a.stage](*st.inputs[a.mb], *ins)
        else:
            outs = self.modules[a.stage](*st.inputs[a.mb], *ins)
        k = len(s.outputs)
        st.out[(a.stage, a.mb)] = dict(zip(s.outputs, outs[:k]))
        if a.stage == self.last:
            if not st.training:
                st.outputs.append(list(outs[k:]))
            elif st.loss_fn is None:  # the loss is the graph's output
                st.loss[a.mb] = outs[k]
                st.losses.append(outs[k].detach())
            else:
                result = pytree.tree_unflatten(list(outs[k:]), self.out_spec)
                target = st.targets[a.mb] if st.targets is not None else None
                loss = st.loss_fn(result) if target is None else st.loss_fn(result, target)
                st.loss[a.mb] = loss
                st.losses.append(loss.detach())

    def _recv_b(self, a, st):
        s = self.spec.stages[a.stage]
        for name in s.outputs:
            if a.peer in s.sinks[name] and self.values[name].grad:
                v = self.values[name]
                g = self.p2p.recv(self._shape(v), v.dtype, self.device, self.peer(a.peer), self._tag("B", a.mb, name))
                _accumulate(st.grads[(a.stage, a.mb)], name, g)

    def _b(self, a, st):
        key = (a.stage, a.mb)
        if a.stage == self.last:
            (st.loss.pop(a.mb) / st.m * st.scale).backward()  # scale: a power of 2, exact
        else:
            grads = st.grads.pop(key, {})
            pairs = [(t, grads[n]) for n, t in st.out[key].items() if n in grads and t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        s = self.spec.stages[a.stage]
        for name, t in st.recv.pop(key, {}).items():
            if not self.values[name].grad:
                continue
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            src = s.sources[name]
            if self.schedule.stage_rank[src] == self.pp_rank:  # a stage on this rank: hand it back
                _accumulate(st.grads[(src, a.mb)], name, g)
            else:
                st.in_grads[key][name] = g
        st.out.pop(key, None)

    def _w(self, a, st):
        deferred.run(st.jobs.pop((a.stage, a.mb), []))

    def _send_b(self, a, st):
        key = (a.stage, a.mb)
        s = self.spec.stages[a.stage]
        for name in s.inputs:  # in the order the peer expects them (``_expect``)
            if s.sources[name] == a.peer and name in st.in_grads[key]:
                self.p2p.send(st.in_grads[key].pop(name), self.peer(a.peer), self._tag("B", a.mb, name))

    # after the schedule -------------------------------------------------------------------------
    def _sync_tied(self, params: dict, before: dict) -> None:
        """Sum this step's gradients of parameters several stages hold over the pipeline ranks
        (what accumulated from earlier steps is already the same on every holder)."""
        if not self.spec.tied:
            return
        comm = current().comm("pp")
        for name in sorted(self.spec.tied):
            p = params.get(name)
            if p is None:
                shape, dtype = self.tied_shapes[name]
                g = torch.zeros(shape, dtype=dtype, device=self.device)
            else:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if name in before:
                    g = g - before[name]
            total = comm.all_reduce(g.to(self.device))  # an offloaded master's gradient is in host memory
            if p is not None:
                total = total.to(p.device)
                p.grad = total + before[name] if name in before else total

    def _overlapping(self, params: dict):
        """The reducer that begins data-parallel all-reduces during backward, where it applies:
        ``overlap``, dp > 1, no ep; for the weights held whole on the device, not tied across
        stages (summed over pp first)."""
        ctx = current()
        dp = ctx.comms.get("dp")
        if not self.overlap or dp is None or dp.world == 1 or ("ep" in ctx.comms and ctx.comms["ep"].world > 1):
            return None
        if self._reducer is None:
            dense = {n: p for n, p in sorted(params.items())
                     if n not in self.split and n not in self.spec.tied and p.device == self.device}
            self._reducer = ReduceWhileBackward(dense, dp)
        return self._reducer

    def _sync_data_parallel(self, params: dict, reduced: set = frozenset()) -> None:
        """Average gradients over the replicas (dp x ep) that each trained on their part of the
        batch. An expert's gradient already sums what the tokens of every ep rank gave it (they
        came to it by all-to-all): it is divided by ep instead of all-reduced there."""
        ctx = current()
        ep = ctx.comms.get("ep")
        if ep is not None and ep.world > 1:  # rows of dense weights came averaged over dp x ep
            dense = [p.grad for n, p in sorted(params.items())
                     if p.grad is not None and n not in self.experts and n not in self.split]
            _average(dense, ep, self.device)
            for n, p in params.items():
                if n in self.experts and p.grad is not None:
                    p.grad.div_(ep.world)
        dp = ctx.comms.get("dp")
        if dp is not None and dp.world > 1:  # rows under zero came averaged out of their reduce-scatter
            _average([p.grad for n, p in sorted(params.items())
                      if p.grad is not None and n not in self.split and n not in reduced], dp, self.device)

    def _everywhere(self, loss: torch.Tensor) -> torch.Tensor:
        ctx = current()
        mine = loss if self.schedule.stage_rank[self.last] == self.pp_rank else torch.zeros_like(loss)
        total = ctx.comm("pp").all_reduce(mine) if "pp" in ctx.comms else mine
        for dim in ("ep", "dp"):
            comm = ctx.comms.get(dim)
            if comm is not None and comm.world > 1:
                total = comm.all_reduce(total) / comm.world
        return total


def _average(grads: list, comm, device) -> None:
    """Each gradient replaced by its mean over ``comm``'s ranks, in flat buckets on ``device``."""
    for bucket in buckets(grads):
        # over the device's transport, for gradients in host memory too (offloaded masters)
        flat = comm.all_reduce_(torch._utils._flatten_dense_tensors(bucket).to(device)).div_(comm.world)
        for g, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            g.copy_(new)


class _State:
    """Everything one step keeps per (stage, microbatch)."""

    def __init__(self, inputs, targets, loss_fn, m, training=False, scale=1.0):
        from collections import defaultdict

        self.inputs, self.targets, self.loss_fn, self.m = inputs, targets, loss_fn, m
        self.training, self.scale = training, scale
        self.recv = defaultdict(dict)
        self.out: dict = {}
        self.grads = defaultdict(dict)
        self.in_grads = defaultdict(dict)
        self.loss: dict = {}
        self.jobs: dict = {}  # (stage, mb) -> weight gradients waiting for W
        self.losses: list = []
        self.outputs: list = []


def _accumulate(d: dict, name: str, g: torch.Tensor) -> None:
    d[name] = g if name not in d else d[name] + g


def split_microbatches(flat: list, m: int, parts: str = "microbatches") -> list[list]:
    """Each tensor input with the batch's size on dim 0 (that of the first tensor input) split into
    ``m`` equal chunks along dim 0; other inputs (a mask, a table) given whole to every microbatch.
    ``parts`` names the chunks in the error for a batch that does not split."""
    out = [[] for _ in range(m)]
    batch = next((x.shape[0] for x in flat if isinstance(x, torch.Tensor) and x.dim()), None)
    for x in flat:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            if x.shape[0] % m:
                raise FxparError(f"a batch of {x.shape[0]} does not split into {m} {parts}; make it divisible by {m}")
            for i, c in enumerate(x.chunk(m, 0)):
                out[i].append(c)
        else:
            for i in range(m):
                out[i].append(x)
    return out


def join_microbatches(outputs: list, batch: int | None = None):
    """One output from the microbatches' outputs. A tensor is concatenated along its first dim of
    the microbatch's size ``batch`` (dim 0 when unknown); a tensor with no such dim (a loss the
    model reduced over the batch) is averaged, as a mean over equal microbatches would be."""
    leaves = [pytree.tree_flatten(o) for o in outputs]
    spec = leaves[0][1]
    joined = []
    for parts in zip(*[lv for lv, _ in leaves]):
        first = parts[0]
        if not isinstance(first, torch.Tensor):
            joined.append(first)
            continue
        dims = [d for d, n in enumerate(first.shape) if batch is None or n == batch]
        if first.dim() and dims:
            joined.append(torch.cat(parts, dims[0]))
        else:
            joined.append(torch.stack(parts).float().mean(0).to(first.dtype))
    return pytree.tree_unflatten(joined, spec)


def microbatch_size(microbatches: list[list]) -> int | None:
    """The batch size of a microbatch: dim 0 of its first tensor input."""
    return next((x.shape[0] for x in microbatches[0] if isinstance(x, torch.Tensor) and x.dim()), None)
