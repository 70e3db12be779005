"""Schedules as data: their grids, how much they keep in flight, their bubbles, and the static
checker that refuses schedules that cannot run."""

import pytest

from fxpar.schedule import Action, Schedule, ScheduleError, check, gpipe, interleaved, lower, make, one_f_one_b


def test_one_f_one_b_grid():
    s = one_f_one_b(2, 4)
    assert [str(a) for a in s.actions[0]] == ["F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3"]
    assert [str(a) for a in s.actions[1]] == ["F1.0", "B1.0", "F1.1", "B1.1", "F1.2", "B1.2", "F1.3", "B1.3"]
    assert "rank 1" in s.grid() and "F1.3" in s.grid()


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 2)])
def test_activations_in_flight(p, m):
    assert gpipe(p, m).in_flight() == [m] * p
    assert one_f_one_b(p, m).in_flight() == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (8, 16)])
def test_bubble_matches_the_formula(p, m):
    for s in (gpipe(p, m), one_f_one_b(p, m)):
        assert s.bubble() == pytest.approx((p - 1) / (m + p - 1))
    inter = interleaved(p, m, 2)
    assert inter.bubble() == pytest.approx((p - 1) / (2 * m + p - 1))
    assert inter.bubble() < one_f_one_b(p, m).bubble()


@pytest.mark.parametrize("name, v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
def test_generated_schedules_pass_the_checker(name, v):
    low = lower(make(name, 4, 8, v))
    check(low)
    sends = sum(a.kind.startswith("SEND") for acts in low.actions for a in acts)
    recvs = sum(a.kind.startswith("RECV") for acts in low.actions for a in acts)
    assert sends == recvs > 0


def _edited(schedule, rank, drop=None, swap=None):
    acts = [list(a) for a in schedule.actions]
    if drop is not None:
        del acts[rank][drop]
    if swap is not None:
        i, j = swap
        acts[rank][i], acts[rank][j] = acts[rank][j], acts[rank][i]
    return Schedule(schedule.name, acts, schedule.stage_rank, schedule.microbatches, schedule.links)


def test_a_missing_recv_is_rejected():
    low = lower(one_f_one_b(2, 2))
    i = next(i for i, a in enumerate(low.actions[1]) if a.kind == "RECV_F")
    with pytest.raises(ScheduleError, match=r"rank 1 runs F1\.0 without the activations of stage 0") as info:
        check(_edited(low, 1, drop=i))
    assert ">> F1.0 <<" in str(info.value)  # the grid marks where it stopped


def test_a_send_nobody_receives_is_rejected():
    low = lower(one_f_one_b(2, 2))
    bad = _edited(low, 0)
    bad.actions[0].append(Action("SEND_F", 0, 1, 1))  # a second copy nobody waits for
    with pytest.raises(ScheduleError, match=r"which never receives them \(missing RECV_F1\.1<-0 on rank 1\)"):
        check(bad)


def test_a_deadlock_is_rejected():
    acts = [
        [Action("RECV_B", 0, 0, 1), Action("F", 0, 0), Action("SEND_F", 0, 0, 1), Action("B", 0, 0)],
        [Action("RECV_F", 1, 0, 0), Action("F", 1, 0), Action("B", 1, 0), Action("SEND_B", 1, 0, 0)],
    ]
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits at RECV_B0.0<-1"):
        check(Schedule("hand-made", acts, [0, 1], 1))


def test_bad_options():
    with pytest.raises(ScheduleError, match="multiple of the pipeline ranks"):
        make("interleaved", 4, 6, 2)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        make("zigzag", 2, 2)
