"""Ops that replace an ATen op on a rank holding only part of a tensor."""

from __future__ import annotations

import torch

from .context import current

aten = torch.ops.aten


def vocab_parallel_embedding(weight, idx, start: int, stop: int, padding_idx: int = -1):
    """Look up the rows ``[start, stop)`` this rank holds; other ids give zeros.

    The sum over ranks (one all-reduce) is the full lookup. ``padding_idx`` is the global id.
    """
    outside = (idx < start) | (idx >= stop)
    local = (idx - start).masked_fill(outside, 0)
    pad = padding_idx - start if padding_idx >= 0 and start <= padding_idx < stop else -1
    out = aten.embedding.default(weight, local, pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def partial_mean(x, dims, keepdim: bool, count, dtype=None):
    """This rank's share of a mean over a sharded dim: its local sum over the global count."""
    return x.sum(dims, keepdim=keepdim, dtype=dtype) / count


def dropout(x, p: float, train: bool, stream: str = "replicated", dim: int = 0, size: int = 0, runs=None,
            context: bool = False):
    """Dropout drawing from one of the rank's random streams.

    ``stream="replicated"``: the same mask on every tp rank (the value is replicated).
    ``stream="sharded"``: the rank's own stream for its slice (Megatron's model-parallel RNG);
    ``context=True``: the value is split over cp, so each cp rank draws from its own streams;
    with ``RNGStreams.exact`` the full mask is drawn from the replicated stream instead and the
    rank keeps its slice, which reproduces the single-device masks exactly. The mask is drawn as
    ATen's CPU dropout draws it, so replicated dropout matches the single-device model bit for bit;
    for backward it keeps a one-byte mask rather than ATen's full-precision noise tensor (the
    fused CUDA kernels keep a mask too; activation memory per CONTEXT's formula assumes it).
    """
    if not train or p == 0.0:
        return x
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    rng = current().rng
    if stream == "sharded" and rng.exact:
        from .collectives import _layout, _take

        full_shape = list(x.shape)
        full_shape[dim] = size
        noise = torch.empty(full_shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=rng.replicated)
        noise = _take(noise, _layout(dim, size, runs, current().comm("tp").world), current().rank)
    else:
        if context:
            gen = rng.context_sharded if stream == "sharded" else rng.context
        else:
            gen = rng.sharded if stream == "sharded" else rng.replicated
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1 - p, generator=gen)
    return _MaskedScale.apply(x, noise != 0, noise.new_ones(()).div_(1 - p))


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale``, saving the boolean mask (1 byte per element) for backward."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask, scale)
        return x * torch.where(mask, scale, torch.zeros((), dtype=x.dtype, device=x.device))

    @staticmethod
    def backward(ctx, g):
        mask, scale = ctx.saved_tensors
        return g * torch.where(mask, scale, torch.zeros((), dtype=g.dtype, device=g.device)), None, None


def vocab_parallel_cross_entropy(x, target, start: int, stop: int, reduction: int = 1, ignore_index: int = -100,
                                 group: str = "tp"):
    """``F.cross_entropy`` of logits split over the ranks along the classes (this rank holds
    classes ``[start, stop)``), without ever holding the whole logits: the maximum, the sum of
    exponentials and the target's logit are each combined by one all-reduce of a value per sample.
    ``reduction``: 0 none, 1 mean (over targets that are not ``ignore_index``), 2 sum."""
    return _VocabParallelCE.apply(x, target, start, stop, reduction, ignore_index, current().comm(group))


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, start, stop, reduction, ignore_index, comm):
        logits = x.movedim(1, -1) if x.dim() > 1 else x  # classes last
        top = comm.all_reduce_max(logits.detach().amax(-1))
        shifted = logits - top.unsqueeze(-1)
        exp = shifted.exp()
        total = comm.all_reduce(exp.sum(-1))
        mine = (target >= start) & (target < stop)
        local = torch.where(mine, target - start, torch.zeros_like(target))
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        picked = comm.all_reduce(picked)
        valid = target != ignore_index
        loss = (total.log() - picked) * valid
        ctx.save_for_backward(exp / total.unsqueeze(-1), local, mine, valid)
        ctx.reduction, ctx.classes_dim = reduction, x.dim() > 1
        count = valid.sum()
        ctx.count = count
        if reduction == 0:
            return loss
        if reduction == 2:
            return loss.sum()
        return loss.sum() / count

    @staticmethod
    def backward(ctx, g):
        softmax, local, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad = grad * valid.unsqueeze(-1)
        if ctx.reduction == 0:
            grad = grad * g.unsqueeze(-1)
        elif ctx.reduction == 1:
            grad = grad * (g / ctx.count)
        else:
            grad = grad * g
        if ctx.classes_dim:
            grad = grad.movedim(-1, 1)
        return grad, None, None, None, None, None, None
