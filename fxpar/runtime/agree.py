"""Checks that ranks agree, made before anything whose size they could disagree on is exchanged.

A collective whose ranks bring tensors of different sizes does not fail cleanly: gloo aborts the
process (``EnforceNotMet ... Received data size doesn't match``), NCCL hangs or reads past the
buffer. And ranks that disagree on their inputs or their model while sizes happen to match give
wrong numbers with no error at all. So every check here first all-gathers one fixed-size digest
per rank; only when the digests differ are the summaries themselves exchanged (as JSON, their
lengths first, each padded to the longest) to name the difference. Every rank then holds every
rank's summary and raises the same ``RankMismatchError``.

Content digests are exact: they hash a tensor's bytes with integer arithmetic that cannot
overflow, so equal tensors give equal digests on any device and with any number of threads
(float sums would not: their rounding depends on the reduction order).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch

from ..errors import CollectiveError, FxparError, RankMismatchError

_PRIME = 2039  # a word's weight is its position mod this prime: a word moved by other than a
# multiple of it changes the digest (a check against accidents, not against an adversary)
_MAX_JSON = 1 << 28  # bytes of one rank's summary
_CHUNK = _PRIME * 514  # words hashed per kernel (about 2**20): the int64 copy stays at 8 MiB


class Group:
    """A communicator of the ranks that must agree, with the device its tensors live on and
    the global rank of each member (for messages)."""

    def __init__(self, comm, device, ranks: list[int] | None = None):
        self.comm = comm
        self.device = device
        self.ranks = list(ranks) if ranks is not None else list(range(comm.world))

    @property
    def world(self) -> int:
        return self.comm.world

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every member's ``values`` (the same count on every rank), in member order."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        return [p.tolist() for p in self.comm.exchange(t)]

    def gather_json(self, obj) -> list:
        """Every member's ``obj`` (anything JSON can hold): lengths first, then the padded bytes."""
        blob = json.dumps(obj, default=repr).encode()
        lengths = [n for (n,) in self.gather_ints([len(blob)])]
        if any(not 0 <= n <= _MAX_JSON for n in lengths):  # a group left in disorder by an earlier failure
            raise CollectiveError(f"ranks sent summaries of impossible lengths {lengths}: the process group is not "
                                  "usable after an earlier failure; restart the job")
        buf = torch.zeros(max(lengths), dtype=torch.uint8)
        if blob:
            buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        parts = self.comm.exchange(buf.to(self.device))
        return [json.loads(bytes(p[:n].cpu().tolist()).decode()) for p, n in zip(parts, lengths)]


def digest(obj) -> int:
    """A 63-bit digest of anything JSON can hold (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def tensor_digest(t: torch.Tensor) -> int:
    """An exact digest of ``t``'s shape, dtype and bytes (the same on every device)."""
    if t.device.type == "meta":
        raise FxparError("a tensor on the meta device has no values to compare")
    x = t.detach()
    if x.is_sparse:
        x = x.to_dense()
    x = x.resolve_conj().resolve_neg()
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_complex():
        x = torch.view_as_real(x)
    raw = x.contiguous().reshape(-1)
    if raw.storage_offset():
        raw = raw.clone()
    raw = raw.view(torch.uint8)
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    words = raw.view(torch.int32)
    weights = _weights(words.device)
    total = 0
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start: start + _CHUNK].to(torch.int64)
        # |word| < 2**31 and weight < 2**11: a chunk of < 2**20 products sums below 2**62, exactly
        total = (total * 1000003 + int((chunk * weights[: chunk.numel()]).sum())) % (1 << 61)
    return digest([list(t.shape), str(t.dtype), total])


_WEIGHTS: dict = {}


def _weights(device) -> torch.Tensor:
    # every chunk starts at a multiple of the prime, so one weight vector serves them all
    key = str(device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.arange(_CHUNK, dtype=torch.int64, device=device) % _PRIME + 1
    return _WEIGHTS[key]


def agree(group: Group, summary, explain: Callable[[list, list[int]], str], classes: list | None = None) -> None:
    """Raise ``RankMismatchError`` on every member unless all hold an equal ``summary`` (with
    ``classes``, a class per member: unless the members of each class do).

    ``explain(summaries, ranks)`` words the error from every member's summary (in member order)
    and their global ranks. One all-gather of 8 bytes when they agree; every member sees every
    digest, so all of them take the same branch."""
    if group.world == 1:
        return
    digests = [d for (d,) in group.gather_ints([digest(summary)])]
    classes = classes if classes is not None else [0] * group.world
    by_class: dict = {}
    for c, d in zip(classes, digests):
        by_class.setdefault(c, set()).add(d)
    if all(len(ds) == 1 for ds in by_class.values()):
        return
    raise RankMismatchError(explain(group.gather_json(summary), group.ranks))


def agree_on_failure(group: Group, fn: Callable, what: str):
    """``fn()``, on every member: if it raises on any, every member raises (the failing ones
    their own error, the others one naming the rank and its message), so that no rank goes on
    to a collective its failed peer will never join."""
    error = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        out, error = None, e
    if group.world == 1:
        if error is not None:
            raise error
        return out
    failed = [r for r, (f,) in zip(group.ranks, group.gather_ints([error is not None])) if f]
    if not failed:
        return out
    messages = group.gather_json("" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    first = group.ranks.index(failed[0])
    others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
    raise FxparError(f"rank {failed[0]}{others} failed {what}, so this rank stops too; its error:\n{messages[first]}")


def differences(summaries: list[dict], ranks: list[int], limit: int = 3) -> list[str]:
    """Lines naming the keys of dict ``summaries`` whose values differ between ranks: which
    ranks have which value (or lack the key)."""
    keys: list = []
    for s in summaries:
        keys += [k for k in s if k not in keys]
    lines = []
    for key in keys:
        groups: dict[str, list[int]] = {}
        for rank, s in zip(ranks, summaries):
            if key not in s:
                value = "missing"
            else:
                value = s[key] if isinstance(s[key], str) else json.dumps(s[key], default=repr)
            groups.setdefault(value, []).append(rank)
        if len(groups) > 1:
            lines.append(f"{key}: " + "; ".join(f"{v} on {describe_ranks(rs)}" for v, rs in groups.items()))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def describe_ranks(rs: list[int]) -> str:
    """'rank 1' or 'ranks 0, 2'."""
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))
