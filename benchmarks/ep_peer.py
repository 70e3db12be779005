"""Expert parallelism for ``bench_tp.py``: the reference MoE at benchmark size, fxpar at ep=2 and
tp=2, and the peer PyTorch offers: its differentiable ``all_to_all_single_autograd``
(``torch.distributed._functional_collectives``, what torchtitan's expert parallelism is built
on) dispatching tokens by hand, with the dense gradients averaged over the ranks as DDP would.

torch 2.13 has no expert-parallel module of its own; the hand-written dispatch below is the
torchtitan recipe (count, exchange counts, all-to-all the rows sorted by expert, run the local
experts, all-to-all back) and is what a user writes without fxpar.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MOE_CFG = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=2048, max_seq_len=128,
               n_experts=8, top_k=2, expert_hidden=512)
BATCH, SEQ = 4, 128


def make_moe():
    from fxpar.models import moe

    torch.manual_seed(0)
    model = moe.Transformer(moe.MoEArgs(**MOE_CFG))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, MOE_CFG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return model, data[:, :-1], data[:, 1:]


def loss_of(out, targets):
    return F.cross_entropy(out.flatten(0, 1), targets.flatten())


def timed(step, iters: int, warmup: int = 3):
    """Mean seconds of ``step()`` (returning the loss) after ``warmup`` calls, and the last loss."""
    for _ in range(warmup):
        loss = step()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    return (time.perf_counter() - t0) / iters, float(loss)


class TorchEPMoE(nn.Module):
    """One MoE layer holding this rank's ``E / world`` experts, tokens dispatched by hand."""

    def __init__(self, layer, rank: int, world: int):
        super().__init__()
        self.gate, self.top_k = layer.gate, layer.top_k
        self.n_experts = len(layer.experts)
        self.local = self.n_experts // world
        self.world = world
        self.experts = nn.ModuleList(layer.experts[rank * self.local:(rank + 1) * self.local])

    def forward(self, x):
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        b, s, d = x.shape
        x = x.view(-1, d)
        weights, idx = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.n_experts)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts)  # rank q: from each rank, its rows for q's experts
        sent = counts.view(self.world, self.local)
        got = got.view(self.world, self.local)
        send_sizes, recv_sizes = sent.sum(1).tolist(), got.sum(1).tolist()
        rows = all_to_all_single_autograd(x[token], recv_sizes, send_sizes, dist.group.WORLD)
        pieces = rows.split(got.flatten().tolist())
        outs = [self.experts[j](torch.cat([pieces[r * self.local + j] for r in range(self.world)]))
                for j in range(self.local)]
        back = [o.split(got[:, j].tolist()) for j, o in enumerate(outs)]
        y = torch.cat([back[j][r] for r in range(self.world) for j in range(self.local)])
        y = all_to_all_single_autograd(y, send_sizes, recv_sizes, dist.group.WORLD)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add(0, token, y).view(b, s, d)


def torch_ep_step(model, tokens, targets, rank: int, world: int):
    """A training step of ``model`` with its MoE layers replaced by ``TorchEPMoE`` on this rank's
    part of the batch; dense gradients averaged over the ranks, experts' divided by the ranks."""
    for block in model.layers:
        block.moe = TorchEPMoE(block.moe, rank, world)
    experts = {id(p) for block in model.layers for p in block.moe.experts.parameters()}
    mine, mine_t = tokens.chunk(world)[rank], targets.chunk(world)[rank]

    def step():
        loss = loss_of(model(mine), mine_t)
        loss.backward()
        dense = [p.grad for p in model.parameters() if id(p) not in experts]
        flat = torch._utils._flatten_dense_tensors(dense)
        dist.all_reduce(flat)
        flat /= world
        for g, new in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense)):
            g.copy_(new)
        for p in model.parameters():  # an expert's gradient sums every rank's tokens: mean of the replicas
            if id(p) in experts:
                p.grad.div_(world)
        total = loss.detach().clone()
        dist.all_reduce(total)
        for p in model.parameters():
            p.grad = None
        return total / world

    return step


def fxpar_ep_step(model, tokens, targets, rank: int, world: int):
    """fxpar at ``Mesh(ep=world)``: ``train_step`` on this rank's part of the batch; the plan's
    bytes per step too."""
    import fxpar

    mine, mine_t = tokens.chunk(world)[rank], targets.chunk(world)[rank]
    pm = fxpar.parallelize(model, fxpar.Mesh(ep=world), example_args=(mine,), loss_fn=loss_of, example_target=mine_t)

    def step():
        loss = pm.train_step(mine, target=mine_t)
        pm.zero_grad()
        return loss

    pm.reset_comm_bytes()
    step()
    return step, pm.comm_bytes()


def run(rank: int, world: int, iters: int) -> dict:
    """Every EP row of the benchmark, on this rank (all ranks call it)."""
    import fxpar

    out = {}
    model, tokens, targets = make_moe()
    step, sent = fxpar_ep_step(model, tokens, targets, rank, world)
    out["fxpar ep"] = (*timed(step, iters), sent)
    model, tokens, targets = make_moe()
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=world), example_args=(tokens,))

    def tp_step():
        loss = loss_of(pm(tokens), targets)
        loss.backward()
        pm.zero_grad()
        return loss.detach()

    out["fxpar tp moe"] = (*timed(tp_step, iters), None)
    model, tokens, targets = make_moe()
    try:
        out["torch ep"] = (*timed(torch_ep_step(model, tokens, targets, rank, world), iters), None)
    except Exception as e:  # noqa: BLE001 - reported in the table instead of a time
        out["torch ep"] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", None)
    return out


def single(iters: int, threads: int):
    """The MoE on one process with ``threads`` threads: seconds per step, loss."""
    model, tokens, targets = make_moe()
    torch.set_num_threads(threads)

    def step():
        loss = loss_of(model(tokens), targets)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return timed(step, iters)
