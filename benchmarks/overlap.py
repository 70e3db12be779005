"""Communication overlapped with computation, in one run: step time with ``overlap=True`` (the
default) against ``overlap=False``, over gloo processes, for dp=2 (each bucket's gradient
all-reduce begun while backward goes on) and tp=2 with sequence parallelism, against DDP
(``torch.nn.parallel.DistributedDataParallel``, whose buckets overlap the same way) at dp=2.

    python benchmarks/overlap.py          # about a minute on 2 cores

Printed: ms per training step (forward, backward, gradient reduction; no optimizer), the median
of the steps after two warm-ups, and the share of each step's all-reduce time that ran beside
backward (from the actions' clocks).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_tp import CFG  # noqa: E402
from benchmarks.zero_bubble import BATCH, LAYERS, loss_fn, make, timed  # noqa: E402
from fxpar.local_ranks import spawn_each  # noqa: E402

CONFIG = {**CFG, "n_layers": LAYERS, "batch": BATCH}


def fxpar_main(rank, world, mesh_kw, iters):
    import torch.distributed as dist

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = fxpar.Mesh(**mesh_kw)
    model, tokens, targets = make()
    dp = mesh.coordinate(rank)["dp"]
    tokens, targets = tokens.chunk(mesh.dp)[dp], targets.chunk(mesh.dp)[dp]
    out = {}
    for overlap in (False, True):
        pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_args=(tokens,), loss_fn=loss_fn, overlap=overlap,
                               sequence_parallel=mesh.tp > 1)

        def step():
            pm.train_step(tokens, target=targets)
            pm.zero_grad()

        t = timed(step, iters)
        events = pm.step_events()
        comm = [(a, b) for name, a, b in events if name.startswith("comm ")]
        backward_end = max((b for name, _, b in events if name[0] in "BW"), default=0.0)
        hidden = sum(max(0.0, min(b, backward_end) - a) for a, b in comm)
        total = sum(b - a for a, b in comm)
        out[overlap] = (t, hidden / total if total else None)
    if mesh.dp > 1:  # DDP, the same replicas
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))

        def ddp_step():
            loss_fn(ddp(tokens), targets).backward()
            ddp.zero_grad()

        out["ddp"] = (timed(ddp_step, iters), None)
    dist.destroy_process_group()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    rows = []
    for mesh_kw in (dict(dp=2), dict(tp=2)):
        results = spawn_each(fxpar_main, 2, mesh_kw, a.iters, timeout=1200)
        if any(isinstance(r, str) for r in results):
            raise RuntimeError(str(results))
        name = "dp=2" if "dp" in mesh_kw else "tp=2, sequence parallel"
        t_off, t_on = (max(r[o][0] for r in results) for o in (False, True))
        hidden = results[0][True][1]
        ddp = max(r["ddp"][0] for r in results) if "ddp" in results[0] else None
        rows.append([name, f"{1e3 * t_off:.1f}", f"{1e3 * t_on:.1f}", f"{t_off / t_on:.2f}x",
                     f"{hidden:.0%}" if hidden is not None else "no background collectives",
                     f"{1e3 * ddp:.1f} ({ddp / t_on:.2f}x)" if ddp else ""])
    print(f"model {CONFIG}; gloo, 1 thread per rank, {os.cpu_count()} cores")
    print(tabulate(rows, headers=["mesh", "overlap=False ms", "overlap=True ms", "speedup",
                                  "all-reduce time beside backward", "DDP ms (vs fxpar overlap)"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
