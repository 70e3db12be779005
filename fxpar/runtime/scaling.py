"""Dynamic loss scaling for ``precision="fp16"`` (``ParallelModule.train_step``).

fp16 holds values down to about 6e-8: small gradients of a loss of order one vanish in it. So the
loss is multiplied by ``scale`` before backward (every fp16 gradient, in every stage and on every
rank, is then ``scale`` times larger), and the fp32 gradients of the masters are divided by it
after they are reduced. A step whose gradients overflowed somewhere (an inf or a NaN on any rank)
is skipped on every rank alike (every master's gradient set to None: the optimizer leaves the
weights and its state as they were) and the scale halves; after ``interval`` good steps in a row it
doubles. These are ``torch.amp.GradScaler``'s rules and defaults; the difference is that the check
spans every rank of the mesh, so no rank steps when another overflowed.
"""

from __future__ import annotations

import torch


class LossScaler:
    """The scale of the loss and its history: ``scale``, ``skipped`` (steps skipped so far) and
    ``last_skipped`` (whether the last step was)."""

    def __init__(self, scale: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000):
        self.scale, self.growth, self.backoff, self.interval = float(scale), growth, backoff, interval
        self.good = 0
        self.skipped = 0
        self.last_skipped = False

    def check_fresh(self, params) -> None:
        """Refuse a step onto gradients still there from an earlier one: they were unscaled
        already, and dividing them again would shrink them."""
        from ..errors import FxparError

        if any(p.grad is not None for p in params):
            raise FxparError("precision='fp16' scales each train_step's loss and unscales its gradients: call "
                             "optimizer.zero_grad() before train_step (accumulate over microbatches= instead)")

    @torch.no_grad()
    def unscale_(self, params, comms: dict, device) -> bool:
        """Divide the gradients of ``params`` by the scale, find whether any rank's overflowed
        (a sum over every mesh dimension's communicator in ``comms``), skip the step if so, and
        update the scale. Returns whether the step was skipped."""
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            g.div_(self.scale)
            bad += (~torch.isfinite(g)).any().to(device=device, dtype=torch.float32)
        for comm in comms.values():
            if comm.world > 1:
                bad = comm.all_reduce(bad)
        self.last_skipped = bool(bad.item() > 0)
        if self.last_skipped:
            for p in params:
                p.grad = None
            self.scale *= self.backoff
            self.good = 0
            self.skipped += 1
        else:
            self.good += 1
            if self.good >= self.interval:
                self.scale *= self.growth
                self.good = 0
        return self.last_skipped
