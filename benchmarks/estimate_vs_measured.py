"""The cost model against measured steps: ``fxpar.estimate`` of the reference GPT and Llama at
tp=2, pp=2 and dp=2 (and one process), against the step time of the same training on gloo
processes of this machine, in the same run.

    python benchmarks/estimate_vs_measured.py      # about two minutes on 2 cores

Each process computes with one thread (two processes on two cores). The ``"cpu"`` profile is
measured first (``fxpar.devices.measure_cpu``: matmul FLOP/s, copy bandwidth, the floor of an
op), the links keep the table's gloo figures. A step is ``pm.train_step`` and AdamW's step.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH, SEQ, ITERS, WARMUP = 8, 128, 12, 3
MODELS = {
    "GPT": ("gpt", dict(n_layer=4, n_embd=256, n_head=8, block_size=SEQ, vocab_size=2048)),
    "Llama": ("llama", dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=256,
                            max_seq_len=SEQ)),
}
MESHES = [(dict(), {}), (dict(tp=2), {}), (dict(tp=2), dict(sequence_parallel=True)),
          (dict(pp=2), dict(microbatches=4)), (dict(dp=2), {}), (dict(dp=2), dict(zero=3))]


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def case(name: str):
    import importlib

    module, cfg = MODELS[name]
    torch.manual_seed(0)
    model, _ = importlib.import_module(f"fxpar.models.{module}").build(**cfg)
    vocab = cfg.get("vocab_size")
    tokens = torch.randint(0, vocab, (BATCH, SEQ))
    target = torch.randint(0, vocab, (BATCH, SEQ))
    return model, tokens, target


def worker(rank: int, world: int, port: int, name: str, mesh: dict, options: dict, out):
    import fxpar

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    model, tokens, target = case(name)
    m = fxpar.Mesh(**mesh)
    part = m.replica(rank), m.replicas
    local, local_target = tokens.chunk(part[1])[part[0]], target.chunk(part[1])[part[0]]
    pm = fxpar.parallelize(model, m, example_args=(local,), loss_fn=loss_fn, example_target=local_target, **options)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    times = []
    for i in range(WARMUP + ITERS):
        dist.barrier()
        t0 = time.perf_counter()
        pm.train_step(local, target=local_target)
        opt.step()
        opt.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(sorted(times[WARMUP:])[ITERS // 2])
    dist.destroy_process_group()


def measured(name: str, mesh: dict, options: dict) -> float:
    world = 1
    for v in mesh.values():
        world *= v
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(worker, args=(world, port, name, mesh, options, out), nprocs=world, start_method="spawn")
    return out.get()


def main():
    import fxpar
    from fxpar.devices import measure_cpu

    cpu = measure_cpu()
    print(f"cpu profile: fp32 {cpu.flops['fp32'] / 1e9:.0f} GFLOP/s, copy {cpu.memory_bw / 1e9:.1f} GB/s, "
          f"op floor {cpu.launch * 1e6:.1f} us, gloo {cpu.intra_alpha * 1e6:.0f} us + {cpu.intra_bw / 1e9:.1f} GB/s")
    rows, errors = [], []
    for name in MODELS:
        for mesh, options in MESHES:
            model, tokens, target = case(name)
            est = fxpar.estimate(model, fxpar.Mesh(**mesh), (tokens,), device=cpu, loss_fn=loss_fn,
                                 example_target=target, **options)
            real = measured(name, mesh, options)
            errors.append(est.step_time / real - 1)
            label = ", ".join(f"{k}={v}" for k, v in {**mesh, **options}.items()) or "one process"
            rows.append([name, label, f"{real * 1e3:.1f}", f"{est.step_time * 1e3:.1f}", f"{est.step_time / real:.2f}",
                         ", ".join(f"{k} {v * 1e3:.1f}" for k, v in est.breakdown.items() if v > 1e-5)])
    print(f"step time, estimate against measured (gloo, one thread per process, batch {BATCH} x {SEQ})")
    print(tabulate(rows, headers=["model", "mesh", "measured ms", "estimate ms", "ratio", "estimate breakdown ms"],
                   disable_numparse=True))
    print(f"mean |error| {sum(abs(e) for e in errors) / len(errors):.1%}, worst {max(errors, key=abs):+.1%}")


if __name__ == "__main__":
    main()
