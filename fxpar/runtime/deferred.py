"""Weight gradients computed later than the rest of backward: the W of zero-bubble schedules.

``passes/split_backward.py`` marks the ops whose weight gradient can wait (a matmul or
convolution of an activation by a parameter), and codegen calls them through ``later``. Inside
``collecting(jobs)`` such an op runs its forward on a small autograd graph of its own, with
detached copies of its inputs as leaves; its backward (B) then computes only the gradients of
the activations it read, and leaves a job in ``jobs`` holding the gradient of its output. ``run``
(W) finishes each job: the weight's gradient from that graph, handed on through the weight's
own autograd history (views of the parameter) into ``.grad``.

Between B and W a job keeps the op's activation input and its output's gradient, never its
output (the job holds the output's gradient edge, not the tensor) nor the weight: the weight gradient of an op linear in its weight does not read the weight, so the
saved weight is dropped after B (``torch.autograd.graph.saved_tensors_hooks`` hands backward a
stand-in of the right shape that holds no memory). Outside ``collecting`` (inference, a
program run without a schedule) ``later`` is the op itself.

    >>> jobs = []
    >>> with collecting(jobs):
    ...     y = later(torch.ops.aten.linear.default, (1,), x, w)
    >>> y.sum().backward()   # x.grad now; w.grad is still None
    >>> run(jobs)            # w.grad now
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree

_state = threading.local()  # the forward of a stage runs on the thread of its rank


@contextlib.contextmanager
def collecting(jobs: list):
    """Ops run through ``later`` in this context leave their weight gradients in ``jobs``."""
    before = getattr(_state, "jobs", None)
    _state.jobs = jobs
    try:
        yield
    finally:
        _state.jobs = before


def later(op, weights: tuple[int, ...], *args, **kwargs):
    """``op(*args, **kwargs)``, whose gradients for the tensors at the flat positions ``weights``
    of ``(args, kwargs)`` wait for ``run``."""
    jobs = getattr(_state, "jobs", None)
    if jobs is None or not torch.is_grad_enabled():
        return op(*args, **kwargs)
    flat, spec = pytree.tree_flatten((args, kwargs))
    held = [i for i in weights if isinstance(flat[i], torch.Tensor) and flat[i].requires_grad]
    if not held:
        return op(*args, **kwargs)
    acts = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and i not in weights]
    job = _Job(op, flat, spec, held, acts)
    jobs.append(job)
    # the weights go in too, for their gradient edges (the output needs grad where only they do);
    # B gives them none, W hands theirs on through the same views
    return _Later.apply(job, len(acts), *[flat[i] for i in acts], *job.outer)


def run(jobs: list) -> None:
    """Finish the weight gradients ``jobs`` hold, latest op first, as backward would."""
    while jobs:
        jobs.pop().finish()


class _Job:
    """One op's forward graph, kept from its forward until its weight gradient is taken."""

    def __init__(self, op, flat, spec, weights, acts):
        self.op, self.flat, self.spec = op, flat, spec
        self.weights, self.acts = weights, acts
        self.outer = [flat[i] for i in weights]  # views of parameters: they cost nothing to keep
        self.grad_out = None
        self.released = False

    def forward(self, acts):
        flat = list(self.flat)
        self.leaves = []
        for i, a in zip(self.acts, acts):
            flat[i] = a.detach().requires_grad_(a.requires_grad)
            self.leaves.append(flat[i])
        self.weight_leaves = []
        for i in self.weights:
            flat[i] = flat[i].detach().requires_grad_()
            self.weight_leaves.append(flat[i])
        self.ptrs = {w.untyped_storage().data_ptr() for w in self.weight_leaves if w.numel()}
        self.flat = None  # the weights are referenced by ``outer``, the activations by the graph
        args, kwargs = pytree.tree_unflatten(flat, self.spec)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.op(*args, **kwargs)
        # the edge, not the tensor: the output's memory goes when the rest of the stage is done with it
        self.out = get_gradient_edge(out)
        return out.detach()

    def _pack(self, t):
        if t.numel() and t.untyped_storage().data_ptr() in self.ptrs:
            return _Weight(self, t)
        return t

    def _unpack(self, packed):
        return packed.get() if isinstance(packed, _Weight) else packed

    def input_grads(self, grad_out):
        """B: the gradients of the activations; the output's gradient kept for ``finish``."""
        want = [a for a in self.leaves if a.requires_grad]
        got = iter(torch.autograd.grad(self.out, want, grad_out, retain_graph=True, allow_unused=True) if want else ())
        self.grad_out = grad_out
        self.released = True  # the weight's saved copy is not read again
        return [next(got) if a.requires_grad else None for a in self.leaves]

    def finish(self):
        """W: the weights' gradients, accumulated into their parameters."""
        if self.grad_out is not None:  # None: the op's output reached no loss
            grads = torch.autograd.grad(self.out, self.weight_leaves, self.grad_out, allow_unused=True)
            pairs = [(w, g) for w, g in zip(self.outer, grads) if g is not None]
            if pairs:
                torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
        self.out = self.leaves = self.weight_leaves = self.outer = self.grad_out = None


class _Weight:
    """A saved weight: itself until B, then a stand-in that holds no memory (a weight gradient
    of an op linear in the weight never reads it)."""

    def __init__(self, job: _Job, t: torch.Tensor):
        self.job = job
        self.tensor = t

    def get(self):
        if not self.job.released:
            return self.tensor
        t, self.tensor = self.tensor, None
        if t is None:
            raise RuntimeError("a deferred weight was read after its input-gradient backward")
        return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


class _Later(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job, n_acts, *inputs):
        ctx.job, ctx.n_weights = job, len(inputs) - n_acts
        return job.forward(inputs[:n_acts])

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *ctx.job.input_grads(grad_out), *[None] * ctx.n_weights)
