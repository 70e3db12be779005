"""A pool of worker processes that share one gloo process group, reused across tests.

Starting processes and a process group costs seconds; tests send small functions to the pool
instead. A task is a module-level function (so it pickles by name) run on every rank; its return
values come back as a list by rank, and a failure on any rank raises here with that rank's
traceback.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

TASK_TIMEOUT = float(os.environ.get("FXPAR_TEST_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - sent back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int):
        self.world = world
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn, *args, timeout: float = TASK_TIMEOUT, **kwargs) -> list:
        """``fn(*args, **kwargs)`` on every rank; the results by rank."""
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: list = [None] * self.world
        failures = []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                raise TimeoutError(f"{fn.__name__} did not finish on every rank within {timeout}s") from None
            if ok:
                out[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            rank, tb = sorted(failures)[0]
            raise AssertionError(f"{fn.__name__} failed on rank {rank} (of {len(failures)} failing):\n{tb}")
        return out

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
