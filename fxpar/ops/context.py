"""The per-rank context a generated program runs in: which communicator serves each mesh
dimension and which random streams dropout draws from.

It lives in a ``ContextVar`` so that simulated ranks, each on its own thread, see their own.
Autograd functions copy what they need at forward time, because backward may run on another
thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field

import torch

from ..errors import FxparError
from .comm import Pending


@dataclass
class RNGStreams:
    """``replicated``: same state on every rank of a stage (``None``: torch's default generator).
    ``sharded``: a different stream per tp rank (Megatron's model-parallel RNG tracker).
    ``exact``: sharded dropout draws the full mask from the replicated stream and keeps its own
    slice, so the masks equal the single-device model's (costs the full mask's memory).
    ``context`` / ``context_sharded``: the same two for values split over cp, a different stream
    per cp rank (each holds other positions); values every cp rank holds whole draw from the
    first two, so the cp ranks' copies of them stay identical."""

    replicated: torch.Generator | None = None
    sharded: torch.Generator | None = None
    exact: bool = False
    mirrors_default: bool = False  # the replicated stream is a copy of torch's default generator
    context: torch.Generator | None = None
    context_sharded: torch.Generator | None = None


PIPELINE_SEED_OFFSET = 100  # Megatron's: each pipeline stage draws its own masks
CONTEXT_SEED_OFFSET = 10007  # each cp rank's positions draw their own masks


def stream_seeds(base: int, tp_rank: int, pp_rank: int) -> tuple[int, int]:
    """Seeds of the replicated and the tensor-parallel stream of a rank: different for every
    pipeline rank (stages must not repeat each other's masks), the tensor-parallel one also for
    every tp rank (Megatron's offset 2718)."""
    replicated = base + PIPELINE_SEED_OFFSET * pp_rank
    return replicated, replicated + 2718 + tp_rank


def context_streams(base: int, tp_rank: int, pp_rank: int, cp_rank: int, device=None):
    """The two streams of values split over cp (``RNGStreams.context``, ``context_sharded``)."""
    replicated, _ = stream_seeds(base, tp_rank, pp_rank)
    seed = replicated + CONTEXT_SEED_OFFSET * (cp_rank + 1)
    return (torch.Generator(device=device).manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed + 2718 + tp_rank))


@dataclass
class RankContext:
    rank: int  # position on the tp dimension
    comms: dict = field(default_factory=dict)  # mesh dim name -> Communicator
    rng: RNGStreams = field(default_factory=RNGStreams)
    # mixture-of-experts layer -> rows each of this rank's experts got in the last step (ep > 1)
    routed: dict = field(default_factory=dict)
    # collectives begun in the background in this step, (label, begun, waited) in perf_counter
    # seconds, when the runtime keeps a trace (a list it empties each step; None: not kept)
    background: list | None = None

    def comm(self, group: str):
        try:
            return self.comms[group]
        except KeyError:
            raise FxparError(f"no communicator for mesh dimension '{group}' in this rank's context") from None


def traced(pending, kind: str, comm, rank: RankContext | None = None):
    """``pending`` (a ``fxpar.ops.comm.Pending``), its time from now to its ``wait()`` kept in
    the ``background`` list of ``rank`` (default: the current rank's) as ``comm <group> <kind>``,
    and the part of it spent in ``wait()`` as ``comm <group> <kind> waited``, for the step's
    trace. A backward passes the rank its forward ran as: autograd may run it on a thread of its
    own, which does not see the current rank."""
    begun = time.perf_counter()
    ctx = rank if rank is not None else _CURRENT.get()
    name = f"comm {getattr(comm, 'name', '')} {kind}".replace("  ", " ")

    def finish():
        called = time.perf_counter()
        out = pending.wait()
        if ctx is not None and ctx.background is not None:
            done = time.perf_counter()
            # in flight, and within it the part the rank spent waiting (not hidden)
            ctx.background += [(name, begun, done), (f"{name} waited", called, done)]
        return out

    return Pending(finish)


_CURRENT: contextvars.ContextVar[RankContext | None] = contextvars.ContextVar("fxpar_rank_context", default=None)


def current_or_none() -> RankContext | None:
    """The rank a program runs as, or None outside the runtime (for what is only recorded)."""
    return _CURRENT.get()


def current() -> RankContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise FxparError(
            "a per-rank fxpar program ran outside its runtime: call it through the module returned by "
            "fxpar.parallelize, or Plan.simulate for all ranks in one process"
        )
    return ctx


@contextlib.contextmanager
def tracing():
    """Within it, the collectives the current rank's ops begin in the background are kept
    (``traced``); yields the list they go into, complete when it ends."""
    ctx = current()
    events = ctx.background = []
    try:
        yield events
    finally:
        ctx.background = None


@contextlib.contextmanager
def running(ctx: RankContext):
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
