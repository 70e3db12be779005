"""State sharding over data parallelism: fxpar's zero=1 and zero=3 against PyTorch's FSDP2
(``fully_shard`` on every layer, then the root: torchtitan's recipe) on the same model, two gloo
processes, one run.

    python benchmarks/zero_vs_fsdp.py            # about a minute on 2 CPU cores

Per setting: the median training step (forward, loss, backward, gradient reduction, AdamW step)
over the timed steps, the ratio to FSDP2's, the bytes each rank holds after a step (weights as the
layers read them, the parameters the optimizer steps, gradients, optimizer state; distinct
storages), fxpar's memory model's estimate of the same, and the last loss (all four runs start
from the same weights and data, so the losses agree).

On CPU a step measures overhead, not speedup (../shared/CONTEXT.md): compare the rows with each
other.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CFG = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=256, max_seq_len=256)
BATCH, SEQ = 8, 128  # per step, over both ranks


def _model():
    from fxpar.models import llama

    torch.manual_seed(0)
    return llama.Transformer(llama.ModelArgs(**CFG))


def _data(rank: int, world: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=g)
    target = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=g)
    return tokens.chunk(world)[rank], target.chunk(world)[rank]


def loss_fn(out, target):
    return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())


def _held(tensors) -> int:
    storages = {}
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _time(step, steps: int, warmup: int = 2):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(loss)


def run_fxpar(zero: int, steps: int):
    import fxpar
    from fxpar.ops.params import SHARDED
    from fxpar.plan_memory import device_memory

    tokens, target = _data(dist.get_rank(), dist.get_world_size())
    pm = fxpar.parallelize(_model(), fxpar.Mesh(dp=2), example_args=(tokens,), loss_fn=loss_fn,
                           example_target=target, zero=zero)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)

    def step():
        loss = pm.train_step(tokens, target=target)
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as FSDP2's do
        return loss

    median, loss = _time(step, steps)
    params = list(pm.parameters())
    whole = [SHARDED[p].full for p in params if p in SHARDED]
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    held = _held(params + whole + [p.grad for p in params] + state)
    estimate = max(m.static for m in device_memory(pm._cache.plans[-1][1], {}))
    return median, held, estimate, loss


def run_fsdp2(steps: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    tokens, target = _data(dist.get_rank(), dist.get_world_size())
    model = _model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = loss_fn(model(tokens), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        mean = loss.detach().clone()  # over the ranks, as fxpar's train_step returns it
        dist.all_reduce(mean)
        return mean / dist.get_world_size()

    median, loss = _time(step, steps)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = [local(p) for p in model.parameters()]
    grads = [local(p.grad) for p in model.parameters()]
    state = [local(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    return median, _held(params + grads + state), None, loss


def _worker(rank: int, world: int, port: int, steps: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {"fxpar zero=1": run_fxpar(1, steps), "fxpar zero=3": run_fxpar(3, steps), "FSDP2": run_fsdp2(steps)}
    out.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args.steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    params = sum(p.numel() for p in _model().parameters())
    peer = max(results[r]["FSDP2"][0] for r in results)
    rows = []
    for name in results[0]:
        step = max(results[r][name][0] for r in results)  # the slower rank sets the pace
        held = max(results[r][name][1] for r in results)
        estimate = results[0][name][2]
        rows.append([name, f"{step * 1e3:.1f}", f"{step / peer:.2f}", f"{held / 2**20:.2f}", f"{held / params:.2f}",
                     "-" if estimate is None else f"{estimate / 2**20:.2f}", f"{results[0][name][3]:.4f}"])
    print(f"Llama ({CFG['n_layers']} layers, dim {CFG['dim']}, {params / 1e6:.1f}M parameters), batch {BATCH}x{SEQ} "
          f"over dp=2 gloo processes, fp32 + AdamW, median of {args.steps} steps")
    print(tabulate(rows, headers=["", "step ms", "vs FSDP2", "MiB held per rank", "bytes/param",
                                  "fxpar estimate MiB", "last loss"], disable_numparse=True))


if __name__ == "__main__":
    main()
