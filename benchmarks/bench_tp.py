"""Tensor-parallel benchmark: fxpar against PyTorch's own DTensor TP and one process.

    python benchmarks/bench_tp.py            # about a minute on 2 CPU cores

Prints, from one run on this machine:

1. forward+backward step time of the same Llama-style model (written with ``-1`` in its head
   views and separate q/k/v projections, so that DTensor's ``parallelize_module`` can run it
   unmodified) at TP=2 with fxpar, at TP=2 with DTensor ``ColwiseParallel``/``RowwiseParallel``
   (torchtitan's plan), with sequence parallelism on both (fxpar's ``sequence_parallel=True``,
   torchtitan's ``SequenceParallel`` plan), with context parallelism over the same two processes
   (fxpar's ``Mesh(cp=2)``, PyTorch's experimental ``context_parallel``), and on one process,
   with the losses of all;
2. the same for a mixture-of-experts Llama (``models/moe.py``, 8 experts, top-2): fxpar's expert
   parallelism (``Mesh(ep=2)``: each process half the experts and half the batch), fxpar's TP of
   the same model, a hand-written expert parallelism on PyTorch's ``all_to_all_single_autograd``
   (``ep_peer.py``) and one process;
3. the bytes each rank sends per step with fxpar against the Megatron bound (2 all-reduces of
   b*s*h per layer per pass, a ring all-reduce sending 2(t-1)/t of its input per rank);
4. capture and compile time of a 32-layer, 4096-wide Llama (7B parameters) on the meta device.

On CPU a step measures overhead, not speedup: two gloo processes on two cores do the work of one
process plus communication (../shared/CONTEXT.md). Compare the two TP columns with each other.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CFG = dict(dim=256, n_layers=4, n_heads=8, hidden=1024, vocab=2048, batch=4, seq=128)


class Block(nn.Module):
    def __init__(self, dim, n_heads, hidden):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.attention_norm = nn.RMSNorm(dim)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.attention_norm(x)
        b, s, _ = h.shape  # read after the norm: under DTensor's SequenceParallel x is a sequence shard
        q, k, v = (w(h).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Model(nn.Module):
    def __init__(self, dim, n_layers, n_heads, hidden, vocab, **_):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def make():
    torch.manual_seed(0)
    model = Model(**CFG)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, CFG["vocab"], (CFG["batch"], CFG["seq"] + 1), generator=g)
    return model, data[:, :-1], data[:, 1:]


def timed_steps(model, tokens, targets, iters, warmup=3):
    def step():
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.item()

    for _ in range(warmup):
        loss = step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters, loss


def dtensor_plan(model):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(len(model.layers)):
        for name in ("wq", "wk", "wv", "w1", "w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("wo", "w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def dtensor_sp_plan(model):
    """torchtitan's sequence-parallel plan for this model: norms on sequence shards, each
    column-parallel projection gathering its input, row-parallel outputs reduce-scattered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i in range(len(model.layers)):
        for name in ("attention_norm", "ffn_norm"):
            plan[f"layers.{i}.{name}"] = SequenceParallel()
        for name in ("wq", "wk", "wv", "w1", "w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel(input_layouts=Shard(1))
        for name in ("wo", "w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel(output_layouts=Shard(1))
    return plan


# the same split for fxpar: embedding and output projection whole, as in the DTensor plan
SAME_AS_DTENSOR = {"tok_embeddings": "replicate", "output": "replicate"}


def worker(rank, world, port, iters, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import fxpar

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    results = {}
    runs = (("fxpar", SAME_AS_DTENSOR, {}), ("fxpar auto", None, {}), ("fxpar sp", None, {"sequence_parallel": True}),
            ("fxpar sp recompute", None, {"sequence_parallel": True, "recompute_gathers": True}))
    for label, overrides, options in runs:
        model, tokens, targets = make()
        pm = fxpar.parallelize(model, fxpar.Mesh(tp=world), example_args=(tokens,), overrides=overrides, **options)
        pm.reset_comm_bytes()
        loss = F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        sent = sum(pm.comm_bytes().values())
        step, loss = timed_steps(pm, tokens, targets, iters)
        results[label] = (step, loss, sent)
    model, tokens, targets = make()
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, dtensor_plan(model))
    step, loss = timed_steps(model, tokens, targets, iters)
    results["DTensor"] = (step, loss, None)
    model, tokens, targets = make()
    parallelize_module(model, mesh, dtensor_sp_plan(model))
    try:
        step, loss = timed_steps(model, tokens, targets, iters)
        results["DTensor sp"] = (step, loss, None)
    except Exception as e:  # noqa: BLE001 - reported in the table instead of a time
        results["DTensor sp"] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", None)
    model, tokens, targets = make()
    pm = fxpar.parallelize(model, fxpar.Mesh(cp=world), example_args=(tokens,))
    pm.reset_comm_bytes()
    F.cross_entropy(pm(tokens).flatten(0, 1), targets.flatten()).backward()
    sent = pm.comm_bytes()
    step, loss = timed_steps(pm, tokens, targets, iters)
    results["fxpar cp"] = (step, loss, sent)
    try:
        results["torch cp"] = (*torch_context_parallel(world, iters), None)
    except Exception as e:  # noqa: BLE001 - reported in the table instead of a time
        results["torch cp"] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", None)
    from benchmarks import ep_peer

    results.update(ep_peer.run(rank, world, iters))
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def torch_context_parallel(world, iters):
    """PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``:
    ring attention inside SDPA, the inputs sharded in place), weight gradients summed over the cp
    ranks as fxpar's are."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    model, tokens, targets = make()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))

    tokens, targets = tokens.clone(), targets.clone()
    with context_parallel(mesh, buffers=[tokens, targets], buffer_seq_dims=[1, 1]):
        def step():
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad = None
            return loss.item()

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(iters):
            loss = step()
    return (time.perf_counter() - t0) / iters, loss


def run_tp(world, iters):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, iters, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = out.get(timeout=1800)
    for p in procs:
        p.join()
    return results


def _dtensor_sp_row(tp, r):
    step, loss, _ = r["DTensor sp"]
    if step is None:
        return [f"DTensor TP={tp} + SequenceParallel", "fails", "", loss]
    return [f"DTensor TP={tp} + SequenceParallel", f"{1000 * step:.1f}", f"{r['DTensor'][0] / step:.2f}x", f"{loss:.6f}"]


def _torch_cp_row(cp, r):
    step, loss, _ = r["torch cp"]
    label = f"torch context_parallel CP={cp} (ring), loss of rank 0's shard"
    if step is None:
        return [label, "fails", "", loss]
    return [label, f"{1000 * step:.1f}", f"{r['DTensor'][0] / step:.2f}x", f"{loss:.6f}"]


def print_ep(ep, r, iters):
    from benchmarks import ep_peer

    one, one_loss = ep_peer.single(iters, os.cpu_count())
    one1, _ = ep_peer.single(iters, 1)
    torch.set_num_threads(1)
    peer = r["torch ep"]
    base = r["fxpar tp moe"][0]
    rows = [
        [f"fxpar EP={ep} (half the experts, half the batch each)", f"{1000 * r['fxpar ep'][0]:.1f}",
         f"{base / r['fxpar ep'][0]:.2f}x", f"{r['fxpar ep'][1]:.6f}"],
        [f"fxpar TP={ep} of the same model", f"{1000 * base:.1f}", "1.00x", f"{r['fxpar tp moe'][1]:.6f}"],
        [f"torch all_to_all_single_autograd EP={ep}, by hand", "fails" if peer[0] is None else f"{1000 * peer[0]:.1f}",
         "" if peer[0] is None else f"{base / peer[0]:.2f}x", peer[1] if peer[0] is None else f"{peer[1]:.6f}"],
        [f"1 process, {os.cpu_count()} threads", f"{1000 * one:.1f}", f"{base / one:.2f}x", f"{one_loss:.6f}"],
        ["1 process, 1 thread", f"{1000 * one1:.1f}", f"{base / one1:.2f}x", ""],
    ]
    print(f"\nmixture of experts {ep_peer.MOE_CFG}, batch {ep_peer.BATCH} x {ep_peer.SEQ}: forward+backward step")
    print(tabulate(rows, headers=["", "ms/step", "speed vs fxpar TP", "loss"], disable_numparse=True))
    if peer[0] is not None:
        print(f"fxpar EP is {peer[0] / r['fxpar ep'][0]:.2f}x the speed of the hand-written torch EP")
    sent = r["fxpar ep"][2]
    print(f"fxpar EP={ep} sends {sum(sent.values()) / 2**20:.3f} MiB per step: "
          + ", ".join(f"{k} {v / 2**20:.3f}" for k, v in sorted(sent.items(), key=lambda kv: -kv[1])))


def megatron_bound(world):
    """Bytes one rank sends per training step for per-layer TP (fp32): forward and backward each do
    2 all-reduces of b*s*h per layer."""
    bsh = CFG["batch"] * CFG["seq"] * CFG["dim"]
    per_allreduce = 2 * (world - 1) / world * bsh * 4
    return 2 * 2 * CFG["n_layers"] * per_allreduce


def compile_7b(tp):
    import fxpar
    from fxpar.capture import capture
    from fxpar.codegen import rank_graph
    from fxpar.planning import plan_graph
    from fxpar.models import llama

    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs())  # 32 layers, 4096 wide, 32 heads
    n_params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 32000, (1, 2048))
    t0 = time.perf_counter()
    cap = capture(model, (tokens,))
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm, ctx = plan_graph(cap, fxpar.Mesh(tp=tp))
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    rank_graph(gm, 0, torch.device("cpu"))
    t_codegen = time.perf_counter() - t0
    return n_params, len(cap.gm.graph.nodes), t_capture, t_plan, t_codegen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tp", type=int, default=2)
    a = ap.parse_args(argv)
    tp = a.tp
    print(f"model: {CFG}; fp32; torch {torch.__version__}; {os.cpu_count()} CPUs; gloo")

    model, tokens, targets = make()
    torch.set_num_threads(os.cpu_count())
    single, single_loss = timed_steps(model, tokens, targets, a.iters)
    torch.set_num_threads(1)
    single1, _ = timed_steps(model, tokens, targets, a.iters)
    r = run_tp(tp, a.iters)
    rows = [
        [f"fxpar TP={tp}", f"{1000 * r['fxpar'][0]:.1f}", f"{r['DTensor'][0] / r['fxpar'][0]:.2f}x", f"{r['fxpar'][1]:.6f}"],
        [f"DTensor parallelize_module TP={tp}", f"{1000 * r['DTensor'][0]:.1f}", "1.00x", f"{r['DTensor'][1]:.6f}"],
        [f"fxpar TP={tp}, automatic plan", f"{1000 * r['fxpar auto'][0]:.1f}", f"{r['DTensor'][0] / r['fxpar auto'][0]:.2f}x", f"{r['fxpar auto'][1]:.6f}"],
        [f"fxpar TP={tp} + sequence parallel", f"{1000 * r['fxpar sp'][0]:.1f}", f"{r['DTensor'][0] / r['fxpar sp'][0]:.2f}x", f"{r['fxpar sp'][1]:.6f}"],
        [f"fxpar TP={tp} + SP, recompute_gathers", f"{1000 * r['fxpar sp recompute'][0]:.1f}",
         f"{r['DTensor'][0] / r['fxpar sp recompute'][0]:.2f}x", f"{r['fxpar sp recompute'][1]:.6f}"],
        _dtensor_sp_row(tp, r),
        [f"fxpar CP={tp} (Ulysses all-to-all)", f"{1000 * r['fxpar cp'][0]:.1f}",
         f"{r['DTensor'][0] / r['fxpar cp'][0]:.2f}x", f"{r['fxpar cp'][1]:.6f}"],
        _torch_cp_row(tp, r),
        [f"1 process, {os.cpu_count()} threads", f"{1000 * single:.1f}", f"{r['DTensor'][0] / single:.2f}x", f"{single_loss:.6f}"],
        ["1 process, 1 thread", f"{1000 * single1:.1f}", f"{r['DTensor'][0] / single1:.2f}x", ""],
    ]
    print("\nforward+backward step (mean of", a.iters, "after 3 warm-up steps)")
    print(tabulate(rows, headers=["", "ms/step", "speed vs DTensor", "loss"], disable_numparse=True))
    if r["DTensor sp"][0] is not None:
        print(f"with sequence parallelism fxpar is {r['DTensor sp'][0] / r['fxpar sp'][0]:.2f}x the speed of DTensor's "
              "SequenceParallel plan; on gloo a reduce-scatter runs as an all-reduce, so sequence parallelism costs time here")

    print_ep(tp, r, a.iters)

    bound = megatron_bound(tp)
    rows = [
        ["fxpar, embedding and output whole (as DTensor)", f"{r['fxpar'][2] / 2**20:.3f}", f"{r['fxpar'][2] / bound:.2f}"],
        ["fxpar, automatic plan (vocab-parallel embedding, split output)", f"{r['fxpar auto'][2] / 2**20:.3f}", f"{r['fxpar auto'][2] / bound:.2f}"],
        ["fxpar, automatic plan + sequence parallel", f"{r['fxpar sp'][2] / 2**20:.3f}", f"{r['fxpar sp'][2] / bound:.2f}"],
        ["fxpar, automatic plan + SP, recompute_gathers", f"{r['fxpar sp recompute'][2] / 2**20:.3f}", f"{r['fxpar sp recompute'][2] / bound:.2f}"],
        ["Megatron bound: 2 all-reduces of b*s*h per layer per pass", f"{bound / 2**20:.3f}", "1.00"],
    ]
    print(f"\nbytes one rank sends per step (forward + backward), TP={tp}")
    print(tabulate(rows, headers=["", "MiB", "vs bound"], disable_numparse=True))
    cp_sent = r["fxpar cp"][2]
    print(f"fxpar CP={tp} sends {sum(cp_sent.values()) / 2**20:.3f} MiB: "
          + ", ".join(f"{k} {v / 2**20:.3f}" for k, v in sorted(cp_sent.items(), key=lambda kv: -kv[1]))
          + " (every weight's gradient is summed over cp, as over data-parallel replicas)")

    print("\ncapture and compile of Llama 7B (32 layers, 4096 wide) on the meta device, seq 2048")
    rows = []
    for t in (2, 8):
        n, nodes, tc, tpl, tcg = compile_7b(t)
        rows.append([t, f"{n / 1e9:.2f}B", nodes, f"{tc:.2f}", f"{tpl:.2f}", f"{tcg:.2f}", f"{tc + tpl + tcg:.2f}"])
    print(tabulate(rows, headers=["tp", "params", "graph nodes", "capture s", "plan s", "rank-0 codegen s", "total s"]))


if __name__ == "__main__":
    main()
