"""Data-parallel gradient all-reduces begun while backward still runs (``overlap=True``).

A parameter's gradient is final when it has been accumulated as many times in this step as in
the step before (autograd accumulates once per backward pass that reaches it: once per
microbatch, plus once per deferred W). The first step learns those counts and reduces at its end
as before. From the second on, a post-accumulate hook marks each gradient final as it happens;
final gradients fill buckets in the order they finish (the same order on every replica: they
run the same program), and each full bucket's all-reduce begins at once, in the background,
while backward goes on with the layers before. After the schedule, ``finish`` begins the last,
partly filled bucket, waits for them all and writes the averages back; gradients that never
became final (a weight this step did not reach) are left to the reduction at the step's end. A
step whose counts differ from the learned ones (it cannot, for one program; a guard against a
wrong answer) is an error.

Each begun all-reduce is kept as an event ``("comm dp all_reduce k", begun, waited)`` for the
Chrome trace, on a row beside the rank's compute.
"""

from __future__ import annotations

import time

import torch

from ..errors import FxparError
from . import buckets


class ReduceWhileBackward:
    """The all-reduce over ``comm`` (the data-parallel replicas) of the gradients of ``params``
    (name -> Parameter), begun bucket by bucket as their last accumulation happens."""

    def __init__(self, params: dict, comm):
        self.params, self.comm = params, comm
        self.expected: dict | None = None  # accumulations per step, learned in the first
        self.counts: dict = {}
        self.active = False
        self.events: list = []
        self._open: list = []
        self._open_bytes = 0
        self._pending: list = []  # (handle, bucket, begun)
        self.cap = buckets.BUCKET_BYTES
        for p in params.values():  # every program of the module hooks them; only the running one counts
            p.register_post_accumulate_grad_hook(self._accumulated)

    def begin_step(self) -> None:
        self.counts = {id(p): 0 for p in self.params.values()}
        self.active = True
        self.events = []
        self._open, self._open_bytes, self._pending = [], 0, []  # nothing left of a step that failed

    def _accumulated(self, p) -> None:
        if not self.active or id(p) not in self.counts:
            return
        self.counts[id(p)] += 1
        if self.expected is not None and self.counts[id(p)] == self.expected.get(id(p)):
            self._final(p)

    def _final(self, p) -> None:
        g = p.grad
        if self._open and (g.dtype != self._open[0].grad.dtype or
                           self._open_bytes + g.numel() * g.element_size() > self.cap):
            self._begin()
        self._open.append(p)
        self._open_bytes += g.numel() * g.element_size()
        if self._open_bytes >= self.cap:
            self._begin()

    def _begin(self) -> None:
        bucket, self._open, self._open_bytes = self._open, [], 0
        begun = time.perf_counter()
        flat = torch._utils._flatten_dense_tensors([p.grad for p in bucket])
        self._pending.append((self.comm.all_reduce_start(flat), bucket, begun))

    def finish(self) -> set:
        """Wait for what began, average, and return the names of the parameters reduced here;
        the others are left to the caller's reduction at the step's end."""
        self.active = False
        if self.expected is None:  # the first step: learn, reduce nothing here
            self.expected = dict(self.counts)
            return set()
        if self._open:
            self._begin()
        done = set()
        for k, (handle, bucket, begun) in enumerate(self._pending):
            flat = handle.wait().div_(self.comm.world)
            self.events.append((f"comm dp all_reduce {k}", begun, time.perf_counter()))
            for p, new in zip(bucket, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in bucket])):
                p.grad.copy_(new)
                done.add(id(p))
        self._pending = []
        wrong = [n for n, p in self.params.items() if self.counts[id(p)] != self.expected[id(p)]]
        if wrong:
            raise FxparError(f"gradients of {', '.join(wrong[:3])} were accumulated {self.counts[id(self.params[wrong[0]])]} "
                             f"times this step and {self.expected[id(self.params[wrong[0]])]} times the step before: "
                             "their all-reduce began before they were final. Use overlap=False for this model")
        return {n for n, p in self.params.items() if id(p) in done}
