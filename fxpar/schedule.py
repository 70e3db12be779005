"""Pipeline schedules as data: for every pipeline rank, the list of actions it runs in order.

Compute actions are ``F`` (forward of one stage on one microbatch), ``B`` (its backward) and, in
the zero-bubble schedules, ``W``: there ``B`` computes only the gradients of the stage's inputs
(what the previous stage waits for) and ``W`` the gradients of the weights, which nothing waits
for, so a schedule may run it later, in what would be a bubble.
``lower`` adds the communication each compute action needs, as explicit actions: ``RECV_F``
before a forward that uses another rank's values, ``SEND_F`` after it, and ``RECV_B``/``SEND_B``
for the gradients. ``check`` runs a lowered schedule symbolically (sends never block, a receive
waits for its send) and rejects one that deadlocks, receives what nobody sends, sends what nobody
receives or computes before its inputs arrived, naming the action and printing the grid with the
step where it stopped (as torch.distributed.pipelining's ``_format_pipeline_order`` does).

    >>> print(one_f_one_b(2, 3).grid())
      step  rank 0    rank 1
    ------  --------  --------
         0  F0.0      F1.0
         1  F0.1      B1.0
         2  B0.0      F1.1
         3  F0.2      B1.1
         4  B0.1      F1.2
         5  B0.2      B1.2

Schedules: ``gpipe`` (all forwards, then all backwards: m microbatches of activations in flight),
``one_f_one_b`` (at most p in flight on the first stage, the same bubble), ``interleaved`` (v
stages per rank, the bubble divided by about v), ``zero_bubble_h1`` (ZB-H1 of Qi et al., ICLR'24:
1F1B's order and activations, each rank's W held back to fill the end; a bubble of
(p-1)(F+B-W) against 1F1B's (p-1)(F+B+W)) and ``zero_bubble_v`` (ZBV: two stages per rank in a V,
stage j and stage 2p-1-j on rank j, near zero bubble at 1F1B's activation memory when F, B and W
cost alike).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tabulate import tabulate

COMPUTE = ("F", "B", "W")


@dataclass(frozen=True)
class Action:
    """``kind`` of ``stage`` on microbatch ``mb``; ``peer`` is the other stage of a SEND/RECV."""

    kind: str
    stage: int
    mb: int
    peer: int | None = None

    def __str__(self) -> str:
        if self.peer is None:
            return f"{self.kind}{self.stage}.{self.mb}"
        arrow = "->" if self.kind.startswith("SEND") else "<-"
        return f"{self.kind}{self.stage}.{self.mb}{arrow}{self.peer}"


class ScheduleError(ValueError):
    """A schedule that cannot run: it deadlocks or its sends and receives do not match."""


@dataclass
class Schedule:
    """``actions[r]`` is what pipeline rank ``r`` runs; stage ``j`` lives on rank ``stage_rank[j]``."""

    name: str
    actions: list[list[Action]]
    stage_rank: list[int]
    microbatches: int
    links: dict = field(default_factory=dict)  # stage -> (stages it receives from, stages it sends to)

    @property
    def ranks(self) -> int:
        return len(self.actions)

    @property
    def stages(self) -> int:
        return len(self.stage_rank)

    def compute_only(self) -> list[list[Action]]:
        return [[a for a in acts if a.kind in COMPUTE] for acts in self.actions]

    # views -----------------------------------------------------------------------------------
    def grid(self, with_comm: bool = False, mark: tuple[int, int] | None = None) -> str:
        """One column per rank, one row per step; ``mark=(rank, step)`` flags a failing action."""
        acts = self.actions if with_comm else self.compute_only()
        rows = []
        for step in range(max(len(a) for a in acts)):
            row = [step]
            for r, a in enumerate(acts):
                cell = str(a[step]) if step < len(a) else ""
                if mark == (r, step):
                    cell = f">> {cell} <<"
                row.append(cell)
            rows.append(row)
        return tabulate(rows, headers=["step"] + [f"rank {r}" for r in range(self.ranks)])

    @property
    def splits_backward(self) -> bool:
        """Whether backward runs as B (input gradients) and W (weight gradients)."""
        return any(a.kind == "W" for acts in self.actions for a in acts)

    def in_flight(self) -> list[int]:
        """Per stage, the most microbatches whose forward ran and backward (B) has not: how many
        microbatches' activations the stage keeps at once."""
        return self._peak("F", "B")

    def rank_in_flight(self) -> list[int]:
        """Per rank, the most microbatches between forward and B at once, over all its stages
        (ZBV keeps 2p of its half-size stages on every rank: 1F1B's first rank's p)."""
        out = []
        for acts in self.compute_only():
            live = peak = 0
            for a in acts:
                live += {"F": 1, "B": -1}.get(a.kind, 0)
                peak = max(peak, live)
            out.append(peak)
        return out

    def weight_pending(self) -> list[int]:
        """Per stage, the most microbatches whose B ran and W has not: what W keeps (the inputs
        of the layers whose weight gradients wait, and the gradients of their outputs). Only
        meaningful where backward is split (``splits_backward``)."""
        return self._peak("B", "W")

    def _peak(self, start: str, end: str) -> list[int]:
        peak = [0] * self.stages
        for acts in self.compute_only():
            live = defaultdict(int)
            for a in acts:
                if a.kind in (start, end):
                    live[a.stage] += 1 if a.kind == start else -1
                    peak[a.stage] = max(peak[a.stage], live[a.stage])
        return peak

    def timeline(self, f=1.0, b=2.0, w=None) -> dict:
        """Start time of every compute action with costs ``f`` (forward), ``b`` (the whole
        backward) and ``w`` (its weight-gradient part, default half of ``b``; numbers, or one per
        stage), respecting each rank's order and the data dependencies between stages (a
        list-scheduling simulation). Where backward is split, B costs ``b - w`` and W costs ``w``."""
        order = self.compute_only()
        cost = self._costs(f, b, w)
        done: dict[tuple, float] = {}
        pos = [0] * self.ranks
        clock = [0.0] * self.ranks
        start: dict[Action, float] = {}
        remaining = sum(len(a) for a in order)
        while remaining:
            progressed = False
            for r in range(self.ranks):
                if pos[r] >= len(order[r]):
                    continue
                a = order[r][pos[r]]
                deps = self._deps(a)
                if not all(d in done for d in deps):
                    continue
                t0 = max([clock[r]] + [done[d] for d in deps])
                start[a] = t0
                clock[r] = t0 + cost(a)
                done[(a.kind, a.stage, a.mb)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
            if not progressed:
                raise ScheduleError("the compute order deadlocks:\n" + self.grid())
        return start

    def _costs(self, f, b, w):
        split = self.splits_backward

        def cost(a: Action) -> float:
            full = _cost(b, a.stage)
            part = full / 2 if w is None else _cost(w, a.stage)
            if a.kind == "F":
                return _cost(f, a.stage)
            if a.kind == "W":
                return part
            return full - part if split else full

        return cost

    def _deps(self, a: Action) -> list[tuple]:
        recv_from, send_to = (self.links or chain(self.stages))[a.stage]
        if a.kind == "F":
            return [("F", s, a.mb) for s in recv_from]
        if a.kind == "W":
            return [("B", a.stage, a.mb)]
        return [("F", a.stage, a.mb)] + [("B", s, a.mb) for s in send_to]

    def makespan(self, f=1.0, b=2.0, w=None) -> float:
        """When the last compute action of ``timeline(f, b, w)`` ends."""
        start = self.timeline(f, b, w)
        cost = self._costs(f, b, w)
        return max(t + cost(a) for a, t in start.items())

    def bubble(self, f=1.0, b=2.0, w=None) -> float:
        """Idle fraction of the ranks' time under ``timeline``."""
        cost = self._costs(f, b, w)
        busy = sum(cost(a) for acts in self.compute_only() for a in acts)
        return 1.0 - busy / (self.ranks * self.makespan(f, b, w))

    def ideal_bubble(self) -> float:
        """The textbook bubble of a p-rank pipeline on m microbatches: (p-1)/(m+p-1), and about
        that divided by v with v stages per rank. With B and W apart and F = B = W (Qi et al.):
        (p-1)/(3m+p-1) for ZB-H1 (a third of 1F1B's idle time), and for ZBV (p-1)/(6m+p-1) once
        m >= 2p-1 (a full V; fewer microbatches leave more), the first microbatch's way down to
        the last rank through half-size stages, which no schedule fills (the paper rounds it to
        zero)."""
        p, m = self.ranks, self.microbatches
        if self.name in _FORMULA:
            return (p - 1) / (_FORMULA[self.name][0] * m + p - 1)
        v = self.stages // p
        return (p - 1) / (v * m + p - 1)

    def formula(self) -> str:
        """``ideal_bubble``'s formula, as text."""
        return _FORMULA.get(self.name, (None, "(p-1)/(v*m+p-1)"))[1]


_FORMULA = {"zbh1": (3, "(p-1)/(3m+p-1)"), "zbv": (6, "(p-1)/(6m+p-1)")}


def _cost(c, stage: int) -> float:
    """A compute action's cost: the same for every stage, or ``c[stage]``."""
    return c if isinstance(c, (int, float)) else c[stage]


def chain(n: int) -> dict[int, tuple[list[int], list[int]]]:
    """Links of ``n`` stages in a line: each receives from the previous and sends to the next."""
    return {j: ([j - 1] if j > 0 else [], [j + 1] if j + 1 < n else []) for j in range(n)}


# generators --------------------------------------------------------------------------------------
def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards, one stage per rank."""
    acts = [[Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)] for r in range(p)]
    return Schedule("gpipe", acts, list(range(p)), m)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r runs p-r-1 warm-up forwards, then alternates."""
    acts = []
    for r in range(p):
        warm = min(p - r - 1, m)
        seq = [Action("F", r, i) for i in range(warm)]
        f = warm
        for i in range(m):
            if f < m:
                seq.append(Action("F", r, f))
                f += 1
            seq.append(Action("B", r, i))
        acts.append(seq)
    return Schedule("1f1b", acts, list(range(p)), m)


def interleaved(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron): rank r holds stages r, r+p, ..., r+(v-1)p. Microbatches go in
    groups of p; ``m`` must be a multiple of p."""
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs the microbatches ({m}) to be a multiple of the pipeline ranks ({p})")
    total = m * v
    acts = []
    for r in range(p):
        def fwd(k):  # the k-th forward of rank r: chunk and microbatch
            group, within = divmod(k, p * v)
            chunk, i = divmod(within, p)
            return Action("F", chunk * p + r, group * p + i)

        def bwd(k):
            group, within = divmod(k, p * v)
            chunk, i = divmod(within, p)
            return Action("B", (v - 1 - chunk) * p + r, group * p + i)

        warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        seq = [fwd(k) for k in range(warm)]
        f = warm
        for k in range(total):
            if f < total:
                seq.append(fwd(f))
                f += 1
            seq.append(bwd(k))
        acts.append(seq)
    return Schedule("interleaved", acts, [j % p for j in range(p * v)], m)


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1: 1F1B's forwards and input-gradient backwards, in 1F1B's order and with its
    activations in flight; rank r holds back the W of its first r backwards, which fill the
    end of its step where 1F1B's rank r waits (torch.distributed.pipelining's zero-bubble
    order with one stage per rank)."""
    acts = []
    for r in range(p):
        warm = min(p - r - 1, m)
        seq = [Action("F", r, i) for i in range(warm)]
        f = warm
        w = 0
        for i in range(m):
            if f < m:
                seq.append(Action("F", r, f))
                f += 1
            seq.append(Action("B", r, i))
            if i >= r:  # rank r's W lag r backwards behind
                seq.append(Action("W", r, w))
                w += 1
        seq += [Action("W", r, i) for i in range(w, m)]
        acts.append(seq)
    return Schedule("zbh1", acts, list(range(p)), m)


def zero_bubble_v(p: int, m: int) -> Schedule:
    """ZBV (Qi et al., section 6): 2p stages in a V, stage j and stage 2p-1-j on rank j, so the
    first and the last stage share rank 0; forwards go down the V and back up, and each rank
    interleaves its two stages' F, B and W (torch.distributed.pipelining's ScheduleZBVZeroBubble
    order). Activations in flight match 1F1B's."""
    n = max(2 * p - 1, m)  # the order for a full pipeline; microbatches past m are dropped
    acts = []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        seq: list[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (p - r) - 1):
            seq.append(Action("F", down, f0))
            f0 += 1
        for _ in range(r):
            seq += [Action("F", up, f1), Action("F", down, f0)]
            f1 += 1
            f0 += 1
        for _ in range(p - r):
            seq += [Action("F", up, f1), Action("B", up, b1), Action("W", up, b1)]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                seq.append(Action("F", down, f0))
                f0 += 1
            seq += [Action("B", down, b0), Action("W", down, b0), Action("F", up, f1), Action("B", up, b1),
                    Action("W", up, b1)]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(r):
            seq += [Action("B", down, b0), Action("B", up, b1)]
            b0 += 1
            b1 += 1
        for _ in range(p - r):
            seq += [Action("B", down, b0), Action("W", down, w0)]
            b0 += 1
            w0 += 1
        seq += [Action("W", up, i) for i in range(w1, b1)]
        seq += [Action("W", down, i) for i in range(w0, b0)]
        acts.append([a for a in seq if a.mb < m])
    return Schedule("zbv", acts, [j if j < p else 2 * p - 1 - j for j in range(2 * p)], m)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved, "zbh1": zero_bubble_h1,
             "zbv": zero_bubble_v}



def make(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """A schedule by name: ``gpipe``, ``1f1b``, ``zbh1``, ``interleaved`` (with ``v`` stages per
    rank) or ``zbv`` (two stages per rank)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if m < 1 or p < 1:
        raise ScheduleError(f"need at least one microbatch and one rank, got m={m}, p={p}")
    if name == "interleaved":
        return interleaved(p, m, max(v, 2))
    if name == "zbv":
        if v not in (1, 2):
            raise ScheduleError(f"zbv runs exactly two stages per rank (a V); got v={v}")
        return zero_bubble_v(p, m)
    if v != 1:
        raise ScheduleError(f"{name} runs one stage per rank; use schedule='interleaved' for v={v}")
    return SCHEDULES[name](p, m)


# communication ---------------------------------------------------------------------------------
def lower(s: Schedule, links: dict[int, tuple[list[int], list[int]]] | None = None) -> Schedule:
    """Add the sends and receives: ``links[j] = (stages j receives from, stages j sends to)``
    (default: a chain). Stages on the same rank hand values over without communication."""
    links = links or chain(s.stages)
    rank = s.stage_rank
    out = []
    for r, acts in enumerate(s.compute_only()):
        seq = []
        for a in acts:
            recv_from, send_to = links[a.stage]
            if a.kind == "F":
                seq += [Action("RECV_F", a.stage, a.mb, src) for src in recv_from if rank[src] != r]
                seq.append(a)
                seq += [Action("SEND_F", a.stage, a.mb, dst) for dst in send_to if rank[dst] != r]
            elif a.kind == "W":  # weight gradients stay on the rank
                seq.append(a)
            else:
                seq += [Action("RECV_B", a.stage, a.mb, dst) for dst in send_to if rank[dst] != r]
                seq.append(a)
                seq += [Action("SEND_B", a.stage, a.mb, src) for src in recv_from if rank[src] != r]
        out.append(seq)
    return Schedule(s.name, out, list(rank), s.microbatches, dict(links))


def check(s: Schedule) -> None:
    """Run a lowered schedule symbolically; raise ``ScheduleError`` if it cannot complete."""
    rank = s.stage_rank
    links = s.links or chain(s.stages)
    sent: Counter = Counter()  # (kind, from stage, to stage, mb) -> sends made
    received: Counter = Counter()
    done: set[tuple] = set()
    pos = [0] * s.ranks
    while True:
        progressed = False
        for r in range(s.ranks):
            while pos[r] < len(s.actions[r]):
                a = s.actions[r][pos[r]]
                if rank[a.stage] != r:
                    raise ScheduleError(f"rank {r} runs {a}, but stage {a.stage} lives on rank {rank[a.stage]}\n" + _at(s, r, pos[r]))
                if a.kind in ("SEND_F", "SEND_B"):
                    need = ("F", a.stage, a.mb) if a.kind == "SEND_F" else ("B", a.stage, a.mb)
                    if need not in done:
                        raise ScheduleError(f"rank {r} sends {a} before computing it\n" + _at(s, r, pos[r]))
                    sent[(a.kind[-1], a.stage, a.peer, a.mb)] += 1
                elif a.kind in ("RECV_F", "RECV_B"):
                    msg = (a.kind[-1], a.peer, a.stage, a.mb)
                    if sent[msg] <= received[msg]:
                        break  # waits for the peer
                    received[msg] += 1
                else:
                    missing = _missing_inputs(a, links, rank, r, received, done)
                    if missing:
                        raise ScheduleError(f"rank {r} runs {a} without {missing}\n" + _at(s, r, pos[r]))
                    done.add((a.kind, a.stage, a.mb))
                pos[r] += 1
                progressed = True
        if all(pos[r] == len(s.actions[r]) for r in range(s.ranks)):
            break
        if not progressed:
            r = next(r for r in range(s.ranks) if pos[r] < len(s.actions[r]))
            a = s.actions[r][pos[r]]
            raise ScheduleError(f"deadlock: rank {r} waits at {a} for a send that never comes\n" + _at(s, r, pos[r]))
    unmatched = +(sent - received)
    if unmatched:
        kind, src, dst, mb = sorted(unmatched)[0]
        raise ScheduleError(
            f"stage {src} sends {'activations' if kind == 'F' else 'gradients'} of microbatch {mb} to stage {dst}, "
            f"which never receives them (missing RECV_{kind}{dst}.{mb}<-{src} on rank {rank[dst]})"
        )
    kinds = COMPUTE if s.splits_backward else ("F", "B")
    for j in range(s.stages):
        for mb in range(s.microbatches):
            for kind in kinds:
                if (kind, j, mb) not in done:
                    raise ScheduleError(f"stage {j} never runs {kind} of microbatch {mb}")


def _missing_inputs(a, links, rank, r, received, done) -> str | None:
    recv_from, send_to = links[a.stage]
    if a.kind == "W":
        return None if ("B", a.stage, a.mb) in done else f"its input-gradient backward B{a.stage}.{a.mb}"
    if a.kind == "F":
        for src in recv_from:
            ok = ("F", src, a.stage, a.mb) in received if rank[src] != r else ("F", src, a.mb) in done
            if not ok:
                return f"the activations of stage {src} (no RECV_F{a.stage}.{a.mb}<-{src} before it)"
        return None
    if ("F", a.stage, a.mb) not in done:
        return f"its forward F{a.stage}.{a.mb}"
    for dst in send_to:
        ok = ("B", dst, a.stage, a.mb) in received if rank[dst] != r else ("B", dst, a.mb) in done
        if not ok:
            return f"the gradients from stage {dst} (no RECV_B{a.stage}.{a.mb}<-{dst} before it)"
    return None


def _at(s: Schedule, r: int, step: int) -> str:
    return s.grid(with_comm=True, mark=(r, step))
