"""Local CPU processes joined in one gloo process group, for the command line's demos and the
benchmarks: ``spawn_local(target, world, *args)`` runs ``target(rank, world, *args, results)``
in ``world`` fresh processes (``MASTER_ADDR``/``MASTER_PORT`` set for them) and returns what rank 0
put in ``results``; ``spawn_each(target, world, *args)`` returns every rank's return value of
``target(rank, world, *args)`` (or the text of what it raised), and stops ranks left waiting.
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
    procs = _start(ctx, [(target, (r, world, *args, results)) for r in range(world)])
    out = results.get(timeout=timeout)
    for p in procs:
        p.join()
    return out


def spawn_each(target, world: int, *args, timeout: float = 900) -> list:
    """Every rank's ``target(rank, world, *args)``, or ``"failed: ..."`` with what it raised; a rank
    still running after ``timeout`` seconds (waiting on a peer that failed) is stopped and gives
    ``"failed: timed out"``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = _start(ctx, [(_report, (target, r, world, args, results)) for r in range(world)])
    out: list = ["failed: timed out"] * world
    try:
        for _ in range(world):
            rank, value = results.get(timeout=timeout)
            out[rank] = value
    except Exception:  # noqa: BLE001 - queue.Empty: the ranks left are stopped below
        pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return out


def _report(target, rank, world, args, results):
    try:
        value = target(rank, world, *args)
    except Exception as e:  # noqa: BLE001 - given back as text
        value = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    results.put((rank, value))


def _start(ctx, calls):
    procs = [ctx.Process(target=fn, args=args) for fn, args in calls]
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
    return procs
