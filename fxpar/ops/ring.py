"""Ring attention: attention over a sequence split along the ranks of a mesh dimension (``cp``),
with the key/value blocks passed around the ring and the softmax accumulated online.

Each rank holds its own positions of q, k and v (``(..., heads, positions, head_dim)``, the
positions given by ``runs``: the common zigzag layout gives rank r the chunks r and 2w-1-r of
2w, so under a causal mask every rank does the same work). In ``w`` steps every rank attends
with its queries to every rank's keys: at step s to those of rank r-s, which then move on to
rank r+1. The blocks of each step are combined by their log-sum-exp (the online softmax of
flash attention), so the result is the single-device attention's. The next block's transfer
begins before this one is computed and is waited for after (``Communicator.shift_start``), so
keys and values travel while scores are computed. Backward goes around the ring again: each block is recomputed from q, k, v and the log-sum-exp, and the gradients of a
key/value block travel with it, arriving home after the last step. No rank holds the whole
sequence's keys (the activations kept are its own positions' q, k, v and output; a mask, when
there is one, is read whole), and pairs of position runs that a causal mask hides entirely are
skipped. Grouped-query keys and values travel and are kept with their own heads, repeated to the
query heads one block at a time (and their gradients summed back), so the ring moves a group's
keys once, not once per query head.

A mask (``attn_mask``, boolean or additive) is read whole, its rows and columns picked for each
block; ``is_causal`` masks by the global positions, not the local ones.

    >>> out = ring_attention(q, k, v, True, None, "0:4,12:16|4:8,8:12", None, group="cp")  # cp=2, T=16
"""

from __future__ import annotations

import functools
import math

import torch

from .context import current, traced
from .library import op, parse_runs


@op("ring_attention(Tensor q, Tensor k, Tensor v, bool is_causal, float? scale, str runs, Tensor? attn_mask=None, "
    "*, str group='cp') -> Tensor")
def ring_attention(q, k, v, is_causal: bool, scale, runs: str, attn_mask=None, *, group: str = "cp"):
    """Attention of this rank's queries to every rank's keys and values (see the module doc);
    ``runs``: every rank's positions, as ``fxpar.ops.library.runs_arg`` writes them."""
    comm = current().comm(group)
    return _Ring.apply(comm, q, k, v, is_causal, q.shape[-1] ** -0.5 if scale is None else scale, runs, attn_mask)


@functools.lru_cache(maxsize=256)
def _positions(runs: str) -> tuple:
    """Per rank, its positions' runs and their offsets within the rank's local positions."""
    out = []
    for rr in parse_runs(runs):
        local, at = [], 0
        for a, b in rr:
            local.append((a, b, at))
            at += b - a
        out.append(tuple(local))
    return tuple(out)


def _pairs(mine, theirs, is_causal):
    """The (query run, key run) pairs a step computes: ``(rows, cols, needs_mask)`` as local
    slices, leaving out pairs a causal mask hides whole."""
    out = []
    for qa, qb, qo in mine:
        for ka, kb, ko in theirs:
            if is_causal and ka > qb - 1:
                continue  # every key after every query
            partial = is_causal and kb - 1 > qa
            out.append((slice(qo, qo + qb - qa), slice(ko, ko + kb - ka), (qa, qb, ka, kb) if partial else None))
    return out


def _scores(q, k, scale, rows, cols, causal, mask, q_index, k_index):
    s = torch.matmul(q[..., rows, :], k[..., cols, :].transpose(-1, -2)).float() * scale
    if causal is not None:
        qa, qb, ka, kb = causal
        hide = torch.arange(ka, kb, device=q.device)[None, :] > torch.arange(qa, qb, device=q.device)[:, None]
        s = s.masked_fill(hide, float("-inf"))
    if mask is not None:
        m = mask.index_select(-2, q_index[rows]).index_select(-1, k_index[cols])
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    return s


def _repeat(t, group: int):
    """Grouped-query keys or values repeated to the query heads (each serves ``group`` of them)."""
    return t if group == 1 else t.repeat_interleave(group, -3)


def _fold(t, group: int):
    """The inverse for gradients: each key/value head's gradient summed over the query heads it
    served."""
    return t if group == 1 else t.unflatten(-3, (t.shape[-3] // group, group)).sum(-3)


def _global_index(local, device):
    return torch.cat([torch.arange(a, b, device=device) for a, b, _ in local])


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, q, k, v, is_causal, scale, runs, mask):
        pos = _positions(runs)
        r, w = comm.rank, comm.world
        q_index = _global_index(pos[r], q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        group = q.shape[-3] // k.shape[-3]
        kk, vv = k, v
        for step in range(w):
            src = (r - step) % w
            # the next block is on its way while this one is computed
            coming = _shift_start(comm, kk, vv) if step + 1 < w else None
            k_index = _global_index(pos[src], q.device)
            kr, vr = _repeat(kk, group), _repeat(vv, group)
            for rows, cols, causal in _pairs(pos[r], pos[src], is_causal):
                s = _scores(q, kr, scale, rows, cols, causal, mask, q_index, k_index)
                block_lse = torch.logsumexp(s, -1)
                p = torch.exp(s - torch.where(torch.isinf(block_lse), 0.0, block_lse)[..., None])
                block = torch.matmul(p.to(vr.dtype), vr[..., cols, :]).float()
                new = torch.logaddexp(lse[..., rows], block_lse)
                keep = torch.where(torch.isinf(new), 0.0, torch.exp(lse[..., rows] - new))
                take = torch.where(torch.isinf(new), 0.0, torch.exp(block_lse - new))
                out[..., rows, :] = out[..., rows, :] * keep[..., None] + block * take[..., None]
                lse[..., rows] = new
            if coming is not None:
                kk, vv = coming.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.comm, ctx.is_causal, ctx.scale, ctx.runs = comm, is_causal, scale, runs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        comm, scale = ctx.comm, ctx.scale
        pos = _positions(ctx.runs)
        r, w = comm.rank, comm.world
        q_index = _global_index(pos[r], q.device)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kk, vv = k, v
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        safe_lse = torch.where(torch.isinf(lse), 0.0, lse)
        group = q.shape[-3] // k.shape[-3]
        for step in range(w):
            src = (r - step) % w
            coming = _shift_start(comm, kk, vv) if step + 1 < w else None
            k_index = _global_index(pos[src], q.device)
            kr, vr = _repeat(kk, group), _repeat(vv, group)
            for rows, cols, causal in _pairs(pos[r], pos[src], ctx.is_causal):
                s = _scores(q, kr, scale, rows, cols, causal, mask, q_index, k_index)
                p = torch.exp(s - safe_lse[..., rows, None])
                g = dout[..., rows, :].float()
                dv[..., cols, :] += _fold(torch.matmul(p.transpose(-1, -2), g), group)
                dp = torch.matmul(g, vr[..., cols, :].float().transpose(-1, -2))
                ds = p * (dp - delta[..., rows, None]) * scale
                dq[..., rows, :] += torch.matmul(ds, kr[..., cols, :].float())
                dk[..., cols, :] += _fold(torch.matmul(ds.transpose(-1, -2), q[..., rows, :].float()), group)
            # the gradients gathered for the block follow it (its keys and values went ahead)
            dk, dv = _shift_start(comm, dk, dv).wait()
            if coming is not None:
                kk, vv = coming.wait()
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class _Coming:
    """Tensors on their way from the previous rank of the ring: ``wait()`` gives them."""

    def __init__(self, pending, shapes):
        self.pending, self.shapes = pending, shapes

    def wait(self):
        got = self.pending.wait()
        out, at = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(got[at:at + n].view(shape))
            at += n
        return tuple(out)


def _shift_start(comm, *tensors) -> _Coming:
    """The tensors (of one dtype) sent to the next rank of the ring in one message, begun now;
    the previous rank's come with ``wait()``."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return _Coming(traced(comm.shift_start(flat), "ring", comm), [t.shape for t in tensors])
