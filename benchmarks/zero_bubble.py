"""Zero-bubble pipelines in one run: 1F1B, ZB-H1 and ZBV, fxpar against
``torch.distributed.pipelining`` (Schedule1F1B, ScheduleInterleavedZeroBubble with one stage per
rank, ScheduleZBVZeroBubble), same model, same even cut, same microbatches, over gloo processes.

    python benchmarks/zero_bubble.py                    # pp=2 and pp=4, about 3 minutes on 2 cores
    python benchmarks/zero_bubble.py --pp 2 --microbatches 8

Printed per pipeline size and schedule: the step time of each system and their ratio, fxpar's
measured bubble (1 - the ranks' time in F, B and W over ranks x the step's span, from the
actions' clocks, which are one monotonic clock across processes), the schedule simulator's bubble
for the F, B and W times measured in the same step, and the formula with F = B = W. With more
processes than cores (pp=4 on 2 cores) a waiting rank gives its core to another, so idle time
shows less than it would on one device per rank.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_tp import CFG, Model  # noqa: E402
from fxpar.local_ranks import spawn_each  # noqa: E402

LAYERS, BATCH = 8, 8
SCHEDULES = ("1f1b", "zbh1", "zbv")


def make():
    torch.manual_seed(0)
    model = Model(**{**CFG, "n_layers": LAYERS})
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, CFG["vocab"], (BATCH, CFG["seq"] + 1), generator=g)
    return model, data[:, :-1], data[:, 1:]


def loss_fn(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def cuts(pp: int, schedule: str) -> list[str]:
    stages = pp * (2 if schedule == "zbv" else 1)
    per = LAYERS // stages
    return [f"layers.{k * per}" for k in range(1, stages)]


def timed(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fxpar_run(pp, schedule, m, iters):
    import fxpar

    model, tokens, targets = make()
    pm = fxpar.parallelize(model, fxpar.Mesh(pp=pp), example_args=(tokens,), loss_fn=loss_fn, schedule=schedule,
                           microbatches=m, split_points=cuts(pp, schedule))

    def step():
        out = pm.train_step(tokens, target=targets)
        pm.zero_grad()
        return out

    t = timed(step, iters)
    return t, pm.step_events()


def torch_run(rank, pp, schedule, m, iters):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble,
                                              SplitPoint, pipeline)

    model, tokens, targets = make()
    pipe = pipeline(model, mb_args=(tokens.chunk(m)[0],), split_spec={c: SplitPoint.BEGINNING for c in cuts(pp, schedule)})
    n = pipe.num_stages
    mine = [rank, n - 1 - rank] if schedule == "zbv" else [rank]
    stages = [pipe.build_stage(i, torch.device("cpu")) for i in mine]
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], m, loss_fn=loss_fn)
    elif schedule == "zbh1":
        sched = ScheduleInterleavedZeroBubble(stages, m, loss_fn=loss_fn)
    else:
        sched = ScheduleZBVZeroBubble(stages, m, loss_fn=loss_fn)
    first, last = 0 in mine, n - 1 in mine

    def step():
        kwargs = dict(target=targets, losses=[]) if last else {}
        sched.step(*((tokens,) if first else ()), **kwargs)
        for s in stages:
            for p in s.submod.parameters():
                p.grad = None

    return timed(step, iters)


def _group(rank, world, seconds):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds))


def fxpar_main(rank, world, m, iters):
    """Every schedule under fxpar: per schedule, the step time and this rank's actions."""
    import torch.distributed as dist

    _group(rank, world, 600)
    out = {schedule: fxpar_run(world, schedule, m, iters) for schedule in SCHEDULES}
    dist.destroy_process_group()
    return out


def torch_main(rank, world, schedule, m, iters):
    """One schedule under torch.distributed.pipelining, in processes of its own: a failure on one
    rank leaves the others waiting on it until the group's timeout."""
    import torch.distributed as dist

    _group(rank, world, 60)
    t = torch_run(rank, world, schedule, m, iters)
    dist.destroy_process_group()
    return t


def measured(per_rank_events: list[list]) -> tuple[float, dict]:
    """The bubble of one step from every rank's actions, and the mean time of F, B and W per stage."""
    span = max(e[2] for ev in per_rank_events for e in ev) - min(e[1] for ev in per_rank_events for e in ev)
    busy = sum(t1 - t0 for ev in per_rank_events for name, t0, t1 in ev if name[0] in "FBW")
    times: dict = {}
    for ev in per_rank_events:
        for name, t0, t1 in ev:
            if name[0] in "FBW":
                stage = int(name[1:].split(".")[0])
                times.setdefault((name[0], stage), []).append(t1 - t0)
    return 1 - busy / (len(per_rank_events) * span), {k: statistics.mean(v) for k, v in times.items()}


def simulated(pp, schedule, m, times) -> float:
    from fxpar import schedule as sched

    s = sched.make(schedule, pp, m)
    f = [times[("F", j)] for j in range(s.stages)]
    w = [times.get(("W", j), 0.0) for j in range(s.stages)]
    b = [times[("B", j)] + w[j] for j in range(s.stages)]
    return s.bubble(f, b, w)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    from fxpar import schedule as sched

    m = a.microbatches
    print(f"model {dict(CFG, n_layers=LAYERS, batch=BATCH)}, {m} microbatches, even cuts; gloo, 1 thread per rank, "
          f"{os.cpu_count()} cores")
    for pp in a.pp:
        fx = spawn_each(fxpar_main, pp, m, a.iters, timeout=1800)
        if any(isinstance(r, str) for r in fx):
            raise RuntimeError(f"fxpar at pp={pp}: {fx}")
        rows = []
        for schedule in SCHEDULES:
            t_fx = max(r[schedule][0] for r in fx)
            bubble, times = measured([r[schedule][1] for r in fx])
            theirs = spawn_each(torch_main, pp, schedule, m, a.iters, timeout=600)
            failed = next((t for t in theirs if isinstance(t, str)), None)
            t_torch = None if failed else max(theirs)
            base = t_fx if schedule == "1f1b" else base
            formula = sched.make(schedule, pp, m).ideal_bubble()
            rows.append([schedule, f"{1e3 * t_fx:.1f}", f"{base / t_fx:.2f}x",
                         f"{1e3 * t_torch:.1f}" if t_torch else failed[:70],
                         f"{t_torch / t_fx:.2f}x" if t_torch else "",
                         f"{bubble:.3f}", f"{simulated(pp, schedule, m, times):.3f}", f"{formula:.3f}"])
        print(f"\npp={pp}")
        print(tabulate(rows, headers=["schedule", "fxpar ms/step", "vs fxpar 1f1b", "torch ms/step",
                                      "fxpar speed vs torch", "bubble measured", "simulated (measured F, B, W)",
                                      "formula (F=B=W)"], disable_numparse=True))


if __name__ == "__main__":
    main()
