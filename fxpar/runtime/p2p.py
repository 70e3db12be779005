"""Point-to-point transports for pipeline stages: over ``torch.distributed`` (``isend``/``irecv``,
every wait with a timeout) or between the threads of a simulation. Tensors are made contiguous
before they are sent (gloo refuses non-contiguous sends, and the peer would wait forever)."""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist

from ..errors import CollectiveError


class DistP2P:
    def __init__(self, timeout: datetime.timedelta):
        self.timeout = timeout
        self.pending = []
        self.sent_bytes = 0

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.detach().contiguous()
        self.sent_bytes += t.numel() * t.element_size()
        self.pending.append((dist.isend(t, dst, tag=tag), t, dst))

    def recv(self, shape, dtype, device, src: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        work = dist.irecv(buf, src, tag=tag)
        self._wait(work, f"receiving {tuple(shape)} {dtype} from rank {src}")
        return buf

    def flush(self) -> None:
        """Wait for every send this rank made (before the buffers are reused or freed)."""
        for work, t, dst in self.pending:
            self._wait(work, f"sending {tuple(t.shape)} to rank {dst}")
        self.pending.clear()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except Exception as e:  # noqa: BLE001
            raise CollectiveError(
                f"pipeline {what} failed (timeout {self.timeout.total_seconds():.0f}s): {e}. "
                "Another rank has probably failed; its own error says why."
            ) from e


class ThreadP2P:
    """Mailboxes shared by the simulated ranks: ``send`` never blocks, ``recv`` waits."""

    def __init__(self, timeout: float = 120.0):
        self.boxes: dict[tuple, list] = {}
        self.cv = threading.Condition()
        self.timeout = timeout
        self.broken = False

    def endpoint(self, rank: int) -> "_ThreadEndpoint":
        return _ThreadEndpoint(self, rank)

    def abort(self) -> None:
        with self.cv:
            self.broken = True
            self.cv.notify_all()


class _ThreadEndpoint:
    def __init__(self, shared: ThreadP2P, rank: int):
        self.shared, self.rank, self.sent_bytes = shared, rank, 0

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.detach().contiguous().clone()
        self.sent_bytes += t.numel() * t.element_size()
        with self.shared.cv:
            self.shared.boxes.setdefault((self.rank, dst, tag), []).append(t)
            self.shared.cv.notify_all()

    def recv(self, shape, dtype, device, src: int, tag: int) -> torch.Tensor:
        key = (src, self.rank, tag)
        with self.shared.cv:
            ok = self.shared.cv.wait_for(lambda: self.shared.boxes.get(key) or self.shared.broken, self.shared.timeout)
            if not ok or self.shared.broken and not self.shared.boxes.get(key):
                raise CollectiveError(f"simulated rank {self.rank}: nothing arrived from rank {src} (tag {tag})")
            t = self.shared.boxes[key].pop(0)
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise CollectiveError(f"rank {self.rank} expected {tuple(shape)} {dtype} from rank {src}, got {tuple(t.shape)} {t.dtype}")
        return t

    def flush(self) -> None:
        pass
