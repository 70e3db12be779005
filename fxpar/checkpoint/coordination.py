"""The collectives of saving and loading: on a gloo group of their own, with fxpar's timeout.

``torch.distributed.checkpoint`` coordinates the ranks with collectives over the group it is
given, with that group's timeout: over the default group that is whatever the user created it
with (30 minutes by default) and, under NCCL, on the GPU. Saving and loading use a gloo group
made with the ``ParallelModule``'s timeout instead (torchtitan does the same for its
checkpoints), and every failure of a collective in them is a ``CollectiveError`` that says what
was being done.
"""

from __future__ import annotations

import contextlib
import datetime
import weakref

import torch.distributed as dist

from ..errors import CollectiveError, FxparError
from ..runtime.agree import Group
from ..runtime.comm import DistComm, LocalComm

# weak: once the user's world is destroyed (``destroy_process_group``) its groups go with it, in
# order; a group held here would be torn down at interpreter exit instead, where gloo's threads
# can abort the process after the job has finished
_GROUPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def distributed() -> bool:
    """Whether a torch.distributed world exists (else a save or load is one process's)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the world (0 alone)."""
    return dist.get_rank() if distributed() else 0


def world() -> int:
    """How many processes save or load together."""
    return dist.get_world_size() if distributed() else 1


def process_group(timeout: datetime.timedelta):
    """The gloo group of every rank for checkpoints waiting ``timeout`` (made once; made by a
    collective, so every rank must ask for it at the same point: in ``save`` or ``load``)."""
    if not distributed():
        return None
    key = (id(dist.group.WORLD), timeout.total_seconds())
    pg = _GROUPS.get(key)
    if pg is None:
        pg = _GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return pg


def group(timeout: datetime.timedelta) -> Group:
    """The ranks of a save or a load, for ``fxpar.runtime.agree`` checks."""
    pg = process_group(timeout)
    if pg is None or world() == 1:
        return Group(LocalComm(), "cpu")
    return Group(DistComm(pg, timeout, "checkpoint"), "cpu")


@contextlib.contextmanager
def failures_as_collective_errors(what: str, timeout: datetime.timedelta):
    """A collective that raises inside this block (gloo, NCCL and the store raise different
    types) becomes a ``CollectiveError`` saying that it happened in ``what``; fxpar's other
    errors pass through."""
    try:
        yield
    except CollectiveError as e:
        if str(e).startswith(what):
            raise
        raise CollectiveError(f"{what} stopped: {e}") from e
    except FxparError:
        raise
    except RuntimeError as e:  # dist.DistError and its kinds are RuntimeErrors too
        raise CollectiveError(
            f"{what} failed on rank {rank()} of {world()} (timeout {timeout.total_seconds():.0f}s): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
            "Another rank has probably failed or did not call it; its own error says why."
        ) from e
