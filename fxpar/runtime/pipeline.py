"""Running one rank's pipeline stages under a lowered schedule.

Every action of the schedule is carried out literally: ``RECV_F``/``RECV_B`` wait for the values
or gradients of one microbatch from one stage, ``F``/``B`` run a stage's forward or backward,
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
from .context import current

BUCKET_BYTES = 25 << 20  # gradient bytes per data-parallel all-reduce (DDP's default bucket)


@dataclass
class Value:
    """A value crossing between stages, as one rank holds it."""

    shape: tuple
    dtype: torch.dtype
    grad: bool  # whether its gradient travels back


class PipelineRunner:
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
    ):
        self.spec, self.schedule, self.modules = spec, schedule, modules
        self.pp_rank, self.peer, self.values = pp_rank, peer, values
        self.out_spec, self.device, self.p2p = out_spec, device, p2p
        self.tied_shapes = tied_shapes or {}
        self.events: list[tuple[str, float, float]] = []  # (action, start, end) of the last step, seconds
        self.last = len(spec.stages) - 1
        self.vid = {name: i for i, name in enumerate(sorted(values))}

    # one training step ------------------------------------------------------------------------
    def train_step(self, microbatches: list[list], targets: list | None, loss_fn, params) -> torch.Tensor:
        m = len(microbatches)
        st = _State(microbatches, targets, loss_fn, m)
        self._run(self.schedule.actions[self.pp_rank], st)
        self.p2p.flush()
        self._sync_tied(params)
        self._sync_data_parallel(params)
        loss = sum(st.losses) / m if st.losses else torch.zeros((), device=self.device)
        return self._everywhere(loss.detach().reshape(()).float())

    def forward(self, microbatches: list[list]):
        """Inference: forwards only; the output (microbatches joined) on every rank."""
        st = _State(microbatches, None, None, len(microbatches))
        self._run(self._forward_actions(len(microbatches)), st)
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

    def busy_fraction(self) -> float:
        """Share of the last step this rank spent computing (not waiting or sending)."""
        if not self.events:
            return 0.0
        busy = sum(t1 - t0 for name, t0, t1 in self.events if name[0] in "FB")
        return busy / (self.events[-1][2] - self.events[0][1])

    def _forward_actions(self, m: int):
        from ..schedule import Action, lower

        mine = [j for j, r in enumerate(self.schedule.stage_rank) if r == self.pp_rank]
        compute = [[Action("F", j, mb) for mb in range(m) for j in range(len(self.schedule.stage_rank))
                    if self.schedule.stage_rank[j] == r] for r in range(self.schedule.ranks)]
        plain = Schedule("forward", compute, list(self.schedule.stage_rank), m)
        acts = lower(plain, self.spec.links()).actions[self.pp_rank]
        return [a for a in acts if a.kind in ("F", "SEND_F", "RECV_F") and a.stage in mine]

    # actions ----------------------------------------------------------------------------------
    def _tag(self, kind: str, mb: int, name: str) -> int:
        return ((mb * len(self.vid) + self.vid[name]) * 2 + (kind == "B")) % (1 << 30)

    def _recv_f(self, a, st):
        s = self.spec.stages[a.stage]
        for name in s.inputs:
            if s.sources[name] == a.peer:
                v = self.values[name]
                t = self.p2p.recv(v.shape, v.dtype, self.device, self.peer(a.peer), self._tag("F", a.mb, name))
                st.recv[(a.stage, a.mb)][name] = t.requires_grad_(v.grad and torch.is_grad_enabled())

    def _send_f(self, a, st):
        s = self.spec.stages[a.stage]
        for name, t in st.out[(a.stage, a.mb)].items():
            if a.peer in s.sinks.get(name, ()):
                self.p2p.send(t, self.peer(a.peer), self._tag("F", a.mb, name))

    def _f(self, a, st):
        s = self.spec.stages[a.stage]
        received = st.recv[(a.stage, a.mb)]
        ins = []
        for name in s.inputs:
            if name not in received:  # made by a stage on this rank: hand it over
                t = st.out[(s.sources[name], a.mb)][name].detach()
                received[name] = t.requires_grad_(self.values[name].grad and torch.is_grad_enabled())
            ins.append(received[name])
        outs = self.modules[a.stage](*st.inputs[a.mb], *ins)
        k = len(s.outputs)
        st.out[(a.stage, a.mb)] = dict(zip(s.outputs, outs[:k]))
        if a.stage == self.last:
            result = pytree.tree_unflatten(list(outs[k:]), self.out_spec)
            if st.loss_fn is None:
                st.outputs.append(result)
            else:
                target = st.targets[a.mb] if st.targets is not None else None
                loss = st.loss_fn(result) if target is None else st.loss_fn(result, target)
                st.loss[a.mb] = loss
                st.losses.append(loss.detach())

    def _recv_b(self, a, st):
        s = self.spec.stages[a.stage]
        for name in s.outputs:
            if a.peer in s.sinks[name] and self.values[name].grad:
                v = self.values[name]
                g = self.p2p.recv(v.shape, v.dtype, self.device, self.peer(a.peer), self._tag("B", a.mb, name))
                _accumulate(st.grads[(a.stage, a.mb)], name, g)

    def _b(self, a, st):
        key = (a.stage, a.mb)
        if a.stage == self.last:
            (st.loss.pop(a.mb) / st.m).backward()
        else:
            pairs = [(t, st.grads[key][n]) for n, t in st.out[key].items() if n in st.grads[key] and t.requires_grad]
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

    def _send_b(self, a, st):
        key = (a.stage, a.mb)
        s = self.spec.stages[a.stage]
        for name, g in list(st.in_grads[key].items()):
            if s.sources[name] == a.peer:
                self.p2p.send(g, self.peer(a.peer), self._tag("B", a.mb, name))

    # after the schedule -------------------------------------------------------------------------
    def _sync_tied(self, params: dict) -> None:
        """Sum the gradients of parameters several stages hold, over the pipeline ranks."""
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
            total = comm.all_reduce(g)
            if p is not None:
                p.grad = total

    def _sync_data_parallel(self, params: dict) -> None:
        comm = current().comms.get("dp")
        if comm is None or comm.world == 1:
            return
        grads = [p.grad for _, p in sorted(params.items()) if p.grad is not None]
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            flat = comm.all_reduce(flat) / comm.world
            for g, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                g.copy_(new)

    def _everywhere(self, loss: torch.Tensor) -> torch.Tensor:
        ctx = current()
        mine = loss if self.last in self._my_stages() else torch.zeros_like(loss)
        total = ctx.comm("pp").all_reduce(mine) if "pp" in ctx.comms else mine
        dp = ctx.comms.get("dp")
        return dp.all_reduce(total) / dp.world if dp is not None and dp.world > 1 else total

    def _my_stages(self):
        return [j for j, r in enumerate(self.schedule.stage_rank) if r == self.pp_rank]


class _State:
    """Everything one step keeps per (stage, microbatch)."""

    def __init__(self, inputs, targets, loss_fn, m):
        from collections import defaultdict

        self.inputs, self.targets, self.loss_fn, self.m = inputs, targets, loss_fn, m
        self.recv = defaultdict(dict)
        self.out: dict = {}
        self.grads = defaultdict(dict)
        self.in_grads = defaultdict(dict)
        self.loss: dict = {}
        self.losses: list = []
        self.outputs: list = []


def _accumulate(d: dict, name: str, g: torch.Tensor) -> None:
    d[name] = g if name not in d else d[name] + g


def _buckets(grads):
    bucket, size = [], 0
    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


def split_microbatches(flat: list, m: int) -> list[list]:
    """Each tensor input split into ``m`` equal chunks along dim 0; other inputs repeated."""
    out = [[] for _ in range(m)]
    for x in flat:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            if x.shape[0] % m:
                raise FxparError(f"a batch of {x.shape[0]} does not split into {m} microbatches; make it divisible")
            for i, c in enumerate(x.chunk(m, 0)):
                out[i].append(c)
        else:
            for i in range(m):
                out[i].append(x)
    return out


def join_microbatches(outputs: list):
    """One output from the microbatches' outputs: tensors concatenated along dim 0, scalars averaged."""
    leaves = [pytree.tree_flatten(o) for o in outputs]
    spec = leaves[0][1]
    joined = []
    for parts in zip(*[lv for lv, _ in leaves]):
        if isinstance(parts[0], torch.Tensor):
            joined.append(torch.cat(parts, 0) if parts[0].dim() > 0 else torch.stack(parts).float().mean().to(parts[0].dtype))
        else:
            joined.append(parts[0])
    return pytree.tree_unflatten(joined, spec)
