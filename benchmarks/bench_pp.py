"""Pipeline benchmark: fxpar against ``torch.distributed.pipelining``, same model, same cut,
same schedule, same microbatches, two gloo processes.

    python benchmarks/bench_pp.py              # about a minute on 2 CPU cores
    python benchmarks/bench_pp.py --schedule gpipe --microbatches 8

Prints the step time of each, the loss of each against one process, and the measured bubble: the
share of a step a rank does not spend in its stage's forward and backward,
1 - m * (t_forward + t_backward) / t_step, averaged over the ranks, next to the formula
(p-1)/(m+p-1). t_forward + t_backward is one microbatch through the rank's stage alone (the same
stage for both systems, timed once), so the two bubbles differ only by their step times.
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
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_tp import CFG, make  # noqa: E402

SPLIT = "layers.2"  # the cut both systems use: half of the 4 layers on each rank


def loss_fn(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def timed(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def fxpar_rank(rank, schedule, m, iters):
    import fxpar

    model, tokens, targets = make()
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=2), example_args=(tokens,), loss_fn=loss_fn,
                           schedule=schedule, microbatches=m, split_points=[SPLIT])
    loss = pm.train_step(tokens, target=targets)

    def step():
        pm.train_step(tokens, target=targets)
        pm.zero_grad()

    return timed(step, iters), float(loss)


def torch_rank(rank, schedule, m, iters):
    from torch.distributed.pipelining import ScheduleGPipe, Schedule1F1B, SplitPoint, pipeline

    model, tokens, targets = make()
    mb = tokens.chunk(m)[0]
    pipe = pipeline(model, mb_args=(mb,), split_spec={SPLIT: SplitPoint.BEGINNING})
    subs = {name: mod for name, mod in pipe.split_gm.named_children()}  # build_stage drops the others
    stage = pipe.build_stage(rank, torch.device("cpu"))
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
    sched = cls(stage, m, loss_fn=loss_fn)
    out = {}

    def step():
        if rank == 0:
            sched.step(tokens)
        else:
            losses = []
            sched.step(target=targets, losses=losses)
            out["loss"] = sum(float(x) for x in losses) / m
        for p in stage.submod.parameters():
            p.grad = None

    t = timed(step, iters)
    # one microbatch through this rank's stage alone, forward and backward: the work both systems do
    x = mb
    with torch.no_grad():
        for j in range(rank):
            x = subs[f"submod_pp_{j}"](x)
            x = x[0] if isinstance(x, tuple) else x
    sub = subs[f"submod_pp_{rank}"]
    x = x.detach().requires_grad_(rank > 0)

    def alone():
        y = sub(x)
        y = y[0] if isinstance(y, tuple) else y
        (loss_fn(y, targets.chunk(m)[0]) if rank == 1 else y.float().pow(2).mean()).backward()

    return t, out.get("loss"), m * timed(alone, iters)


def worker(rank, port, schedule, m, iters, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    res = {"fxpar": fxpar_rank(rank, schedule, m, iters)}
    dist.barrier()
    res["torch.distributed.pipelining"] = torch_rank(rank, schedule, m, iters)
    q.put((rank, res))
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, a.schedule, a.microbatches, a.iters, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    model, tokens, targets = make()
    with torch.no_grad():
        single = float(loss_fn(model(tokens), targets))
    p, m = 2, a.microbatches
    rows = []
    busy = [results[r]["torch.distributed.pipelining"][2] for r in range(2)]
    for system in ("fxpar", "torch.distributed.pipelining"):
        step = max(results[r][system][0] for r in range(2))
        loss = next(results[r][system][1] for r in (1, 0) if results[r][system][1] is not None)
        bubble = sum(1 - busy[r] / results[r][system][0] for r in range(2)) / 2
        rows.append([system, f"{1000 * step:.1f}", f"{loss:.6f}", f"{abs(loss - single):.1e}", f"{bubble:.3f}"])
    ratio = float(rows[1][1]) / float(rows[0][1])
    print(f"model {CFG}; pp=2 cut before {SPLIT}; {a.schedule}, {m} microbatches; gloo, 1 thread per rank")
    print(tabulate(rows, headers=["", "ms/step", "loss", "|loss - 1 process|", "bubble (measured)"], disable_numparse=True))
    print(f"fxpar is {ratio:.2f}x the speed of torch.distributed.pipelining; formula bubble (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f}")


if __name__ == "__main__":
    main()
