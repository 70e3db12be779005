"""Weight gradients computed later than the rest of backward: the W of zero-bubble schedules.

``passes/split_backward.py`` marks the ops whose weight gradient can wait (a matmul or
convolution of an activation by a parameter), and codegen calls them through ``later``. Inside
``collecting(jobs)`` such an op leaves a job in ``jobs``; its backward (B) computes only the
gradient of the activation it read and keeps its output's gradient in the job. ``run`` (W)
finishes the jobs: each weight's gradient, handed on through the weight's own history (views of
the parameter, a sum over the ranks that share it, zero's gather) into ``.grad``.

Two kinds of job. A linear layer in any of its spellings (``linear``, ``mm``, ``matmul`` by a
2-d weight, ``addmm``) has its gradients written out: B one matmul, W one (and a sum for a bias),
no autograd graph of its own. Any other op (a convolution, an einsum) runs its forward on a small
autograd graph with detached copies of its inputs as leaves, and B and W each take their part
of that graph's backward.

Between B and W a job keeps the op's activation input and its output's gradient (the general
job also the tensors its op's own backward saved, as autograd would until B), never its output
(the general job holds the output's gradient edge, not the tensor). The weights it refers to are
the parameters' own views, or copies kept between steps anyway. Outside ``collecting``
(inference, a program run without a schedule) ``later`` is the op itself.

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
    # no edge to the weights: B would call their history with zeros (a collective on the way,
    # zero gradients accumulated); an anchor of no size makes the output need grad where only
    # the weights do, and W hands theirs on
    anchor = torch.empty(0, requires_grad=True)
    fast = _Product.of(op, flat, held)
    if fast is not None:
        jobs.append(fast)
        return _LaterProduct.apply(fast, fast.x, anchor)
    acts = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and i not in weights]
    job = _Job(op, flat, spec, held, acts)
    jobs.append(job)
    return _Later.apply(job, len(acts), *[flat[i] for i in acts], anchor)


def run(jobs: list) -> None:
    """Finish the weight gradients ``jobs`` hold and hand them to their weights in one backward
    through the weights' own histories (views, a sum over ranks), latest op first."""
    pairs = []
    while jobs:
        pairs += jobs.pop().finish()
    through = []
    for w, g in pairs:
        if _plain_leaf(w, g):  # what AccumulateGrad does, without the copy it makes of a gradient still referenced
            if w.grad is None:
                w.grad = g
            else:
                w.grad.add_(g)
        else:
            through.append((w, g))
    if through:
        torch.autograd.backward([w for w, _ in through], [g for _, g in through])


def _plain_leaf(w: torch.Tensor, g: torch.Tensor) -> bool:
    """A parameter with no hooks, and a gradient laid out as it is: ``.grad`` can be set."""
    return (w.is_leaf and not w._backward_hooks and not getattr(w, "_post_accumulate_grad_hooks", None)
            and g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous() == w.is_contiguous()
            and g.device == w.device)


class _Product:
    """An activation times a weight in one of the spellings of a linear layer, whose gradients
    are written out: B one matmul for the activation's, W one for the weight's (and a sum for a
    bias), with no autograd graph of its own."""

    def __init__(self, kind, op, flat, x, w, b):
        self.kind, self.op, self.flat = kind, op, flat
        self.x, self.w, self.b = flat[x], flat[w], (flat[b] if b is not None else None)
        self.grad_out = None

    @classmethod
    def of(cls, op, flat, held):
        """The product ``op(*flat)`` is, when its gradients are written out here; else None."""
        aten = torch.ops.aten
        tensors = [isinstance(t, torch.Tensor) for t in flat]
        if op is aten.linear.default and held[0] == 1 and tensors[0] and flat[1].dim() == 2:
            b = 2 if 2 in held else None
            if b is None and len(flat) > 2 and tensors[2] and flat[2].requires_grad:
                return None  # a bias that is no weight: its gradient goes through autograd
            return cls("linear", op, flat, 0, 1, b)
        if op in (aten.mm.default, aten.matmul.default) and held == [1] and len(flat) == 2 and all(tensors):
            if flat[1].dim() == 2 and flat[0].dim() >= 2:
                return cls("right", op, flat, 0, 1, None)
        if op is aten.mm.default and held == [0] and len(flat) == 2 and all(tensors):
            return cls("left", op, flat, 1, 0, None)
        if op is aten.addmm.default and len(flat) == 3 and all(tensors) and held in ([2], [0, 2], [2, 0]):
            if (0 in held and flat[0].dim() <= 1) or (0 not in held and not flat[0].requires_grad):
                return cls("addmm", op, flat, 1, 2, 0 if 0 in held else None)
        return None

    def forward(self):
        out = self.op(*self.flat)
        self.flat = None
        return out

    def kept(self) -> list:
        """The tensors held until W (the weights are the parameters' own)."""
        return [t for t in (self.x, self.grad_out) if t is not None]

    def input_grad(self, g):
        self.grad_out = g
        if not self.x.requires_grad:
            return None
        if self.kind == "linear":
            return torch.matmul(g, self.w)
        if self.kind == "left":
            return torch.matmul(self.w.t(), g)
        return torch.matmul(g, self.w.t())  # right, addmm

    def finish(self) -> list:
        g, x = self.grad_out, self.x
        self.grad_out = self.x = None
        if g is None:  # the output reached no loss
            return []
        if self.kind == "linear":
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            out = [(self.w, torch.mm(g2.t(), x2))]
        elif self.kind == "left":
            out = [(self.w, torch.mm(g, x.t()))]
        else:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            out = [(self.w, torch.mm(x2.t(), g2))]
        if self.b is not None:  # broadcast over the rows (and columns, for a bias of one element)
            out.append((self.b, g.sum_to_size(self.b.shape)))
        return out


class _LaterProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job, x, anchor):
        ctx.job = job
        return job.forward()

    @staticmethod
    def backward(ctx, grad_out):
        return None, ctx.job.input_grad(grad_out), None


class _Job:
    """Any other op: its forward on an autograd graph of its own, kept from its forward until its
    weight gradient is taken."""

    def __init__(self, op, flat, spec, weights, acts):
        self.op, self.flat, self.spec = op, flat, spec
        self.weights, self.acts = weights, acts
        self.outer = [flat[i] for i in weights]  # views of parameters (or kept copies): nothing to keep
        self.grad_out = None

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
        self.flat = None  # the weights are referenced by ``outer``, the activations by the graph
        args, kwargs = pytree.tree_unflatten(flat, self.spec)
        with torch.enable_grad():
            out = self.op(*args, **kwargs)
        # the edge, not the tensor: the output's memory goes when the rest of the stage is done with it
        self.out = get_gradient_edge(out)
        return out.detach()

    def kept(self) -> list:
        """The tensors held until W (the weights are the parameters' own)."""
        return [t for t in (*(self.leaves or ()), self.grad_out) if t is not None]

    def input_grads(self, grad_out):
        """B: the gradients of the activations; the output's gradient kept for ``finish``."""
        want = [a for a in self.leaves if a.requires_grad]
        got = iter(torch.autograd.grad(self.out, want, grad_out, retain_graph=True, allow_unused=True) if want else ())
        self.grad_out = grad_out
        return [next(got) if a.requires_grad else None for a in self.leaves]

    def finish(self) -> list:
        """W: ``(weight, its gradient)`` pairs."""
        pairs = []
        if self.grad_out is not None:  # None: the op's output reached no loss
            grads = torch.autograd.grad(self.out, self.weight_leaves, self.grad_out, allow_unused=True)
            pairs = [(w, g) for w, g in zip(self.outer, grads) if g is not None]
        self.out = self.leaves = self.weight_leaves = self.outer = self.grad_out = None
        return pairs


class _Later(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job, n_acts, *inputs):
        ctx.job = job
        return job.forward(inputs[:n_acts])

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *ctx.job.input_grads(grad_out), None)
