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


def dropout(x, p: float, train: bool, stream: str = "replicated", dim: int = 0, size: int = 0, runs=None):
    """Dropout drawing from one of the rank's random streams.

    ``stream="replicated"``: the same mask on every tp rank (the value is replicated).
    ``stream="sharded"``: the rank's own stream for its slice (Megatron's model-parallel RNG);
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
