"""Local CPU processes joined in one gloo process group, for the command line's demos and the
benchmarks: ``spawn_local(target, world, *args)`` runs ``target(rank, world, *args, results)``
in ``world`` fresh processes (``MASTER_ADDR``/``MASTER_PORT`` set for them) and returns what rank 0
put in ``results``.
"""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(target, world: int, *args, timeout: float = 900):
    """Rank 0's result of ``target(rank, world, *args, results)`` over ``world`` processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, *args, results)) for r in range(world)]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # the children inherit it
    try:
        for p in procs:
            p.start()
    finally:  # this process keeps its own
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = results.get(timeout=timeout)
    for p in procs:
        p.join()
    return out
