"""Point-to-point transports for pipeline stages: over ``torch.distributed`` (``isend``/``irecv``,
every wait with a timeout) or between the threads of a simulation. Tensors are made contiguous
before they are sent (gloo refuses non-contiguous sends, and the peer would wait forever)."""

from __future__ import annotations

import datetime
import threading

import torch
import torch.distributed as dist

from ..errors import CollectiveError


AHEAD = 2  # receives posted before they are needed, per peer (gloo): the data lands while this rank computes


class DistP2P:
    """Receives are posted in the order each peer sends (``expect``): NCCL matches a pair's
    messages by order, not by tag. On gloo (CPU tensors) the first ``AHEAD`` of a step are posted
    when the step begins and each one taken posts the next, so a peer's send finds its receive
    waiting. Not on NCCL: a pair's sends and receives share one stream there, and a receive posted
    early would hold back this rank's own send that the peer waits for."""

    def __init__(self, timeout: datetime.timedelta, order_only: bool = False):
        self.timeout = timeout
        self.order_only = order_only  # ignore tags, as NCCL does (to test the ordering on gloo)
        self.pending = []
        self.sent_bytes = 0
        self.expected: dict[int, list] = {}  # peer -> messages (tag, shape, dtype) not yet posted
        self.posted: dict[int, dict] = {}  # peer -> tag -> (work, buffer)
        self.device = None

    def expect(self, src: int, messages: list, device) -> None:
        """The messages (tag, shape, dtype) rank ``src`` will send here in this step, in its order."""
        self.expected[src] = list(messages)
        self.posted.setdefault(src, {})
        self.device = device
        self._post_ahead(src)

    def _post_ahead(self, src: int) -> None:
        posted, queue = self.posted[src], self.expected.get(src, [])
        # gloo matches receives of one tag from one peer in no fixed order: with tags ignored (the
        # test of NCCL's matching by order) nothing is posted before it is needed
        ahead = AHEAD if not self.order_only and self.device is not None and self.device.type == "cpu" else 0
        while len(posted) < ahead and queue:
            self._post(src, *queue.pop(0))

    def _post(self, src: int, tag: int, shape, dtype) -> None:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self.posted[src][tag] = (dist.irecv(buf, src, tag=0 if self.order_only else tag), buf)

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.detach().contiguous()
        self.sent_bytes += t.numel() * t.element_size()
        # a send keeps its tensor until it completes; drop those that have
        self.pending = [p for p in self.pending if not p[0].is_completed()]
        self.pending.append((dist.isend(t, dst, tag=0 if self.order_only else tag), t, dst))

    def recv(self, shape, dtype, device, src: int, tag: int) -> torch.Tensor:
        posted = self.posted.setdefault(src, {})
        queue = self.expected.get(src, [])
        self.device = self.device or device
        while tag not in posted and queue:  # post everything the peer sends before it
            self._post(src, *queue.pop(0))
        if tag not in posted:
            self._post(src, tag, shape, dtype)
        work, buf = posted.pop(tag)
        self._post_ahead(src)
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

    def endpoint(self, rank: int) -> "_ThreadEndpoint":  # noqa: D401
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

    def expect(self, src: int, messages: list, device) -> None:
        pass  # mailboxes are keyed by tag: order does not matter
