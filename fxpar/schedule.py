"""Pipeline schedules as data: for every pipeline rank, the list of actions it runs in order.

Compute actions are ``F`` (forward of one stage on one microbatch) and ``B`` (its backward).
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
stages per rank, the bubble divided by about v).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tabulate import tabulate

COMPUTE = ("F", "B")


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

    def in_flight(self) -> list[int]:
        """Per stage, the most microbatches whose forward ran and backward has not."""
        peak = [0] * self.stages
        for acts in self.compute_only():
            live = defaultdict(int)
            for a in acts:
                live[a.stage] += 1 if a.kind == "F" else -1
                peak[a.stage] = max(peak[a.stage], live[a.stage])
        return peak

    def timeline(self, f=1.0, b=2.0) -> dict:
        """Start time of every compute action with costs ``f`` and ``b`` (numbers, or one per
        stage), respecting each rank's order and the data dependencies between stages (a
        list-scheduling simulation)."""
        order = self.compute_only()
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
                clock[r] = t0 + _cost(f if a.kind == "F" else b, a.stage)
                done[(a.kind, a.stage, a.mb)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
            if not progressed:
                raise ScheduleError("the compute order deadlocks:\n" + self.grid())
        return start

    def _deps(self, a: Action) -> list[tuple]:
        recv_from, send_to = (self.links or chain(self.stages))[a.stage]
        if a.kind == "F":
            return [("F", s, a.mb) for s in recv_from]
        return [("F", a.stage, a.mb)] + [("B", s, a.mb) for s in send_to]

    def makespan(self, f=1.0, b=2.0) -> float:
        """When the last compute action of ``timeline(f, b)`` ends."""
        start = self.timeline(f, b)
        return max(t + _cost(f if a.kind == "F" else b, a.stage) for a, t in start.items())

    def bubble(self, f=1.0, b=2.0) -> float:
        """Idle fraction of the ranks' time under ``timeline``."""
        busy = sum(_cost(f if a.kind == "F" else b, a.stage) for acts in self.compute_only() for a in acts)
        return 1.0 - busy / (self.ranks * self.makespan(f, b))

    def ideal_bubble(self) -> float:
        """The textbook bubble of a p-rank pipeline on m microbatches: (p-1)/(m+p-1), and about
        that divided by v with v stages per rank."""
        p, m = self.ranks, self.microbatches
        v = self.stages // p
        return (p - 1) / (v * m + p - 1)


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


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved}


def make(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """A schedule by name: ``gpipe``, ``1f1b`` or ``interleaved`` (with ``v`` stages per rank)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if m < 1 or p < 1:
        raise ScheduleError(f"need at least one microbatch and one rank, got m={m}, p={p}")
    if name == "interleaved":
        return interleaved(p, m, max(v, 2))
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
    for j in range(s.stages):
        for mb in range(s.microbatches):
            for kind in COMPUTE:
                if (kind, j, mb) not in done:
                    raise ScheduleError(f"stage {j} never runs {kind} of microbatch {mb}")


def _missing_inputs(a, links, rank, r, received, done) -> str | None:
    recv_from, send_to = links[a.stage]
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
