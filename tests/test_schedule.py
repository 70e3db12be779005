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


# zero bubble: backward split into B (input gradients) and W (weight gradients) --------------------
@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 2), (4, 8), (8, 32), (3, 5)])
@pytest.mark.parametrize("name", ["zbh1", "zbv"])
def test_zero_bubble_schedules_pass_the_checker(name, p, m):
    s = make(name, p, m)
    assert s.splits_backward
    check(lower(s))
    for stage in range(s.stages):  # every W after its own B, on the stage's rank
        acts = s.actions[s.stage_rank[stage]]
        for mb in range(m):
            assert acts.index(Action("B", stage, mb)) < acts.index(Action("W", stage, mb))


@pytest.mark.parametrize("p, m", [(4, 8), (8, 32)])
def test_zero_bubble_bubbles_match_the_paper(p, m):
    """Qi et al. with T_F = T_B = T_W (f=1, b=2, w=1): bubble over compute (p-1)/m for 1F1B and
    (p-1)/3m for ZB-H1. For ZBV the paper gives 0 once m >= 2p-1; what is left is the time the
    first microbatch takes to reach the last rank, (p-1) forwards of half a layer, which no
    schedule can fill."""
    rate = lambda s: s.bubble() / (1 - s.bubble())  # noqa: E731  idle over busy time
    assert rate(make("1f1b", p, m)) == pytest.approx((p - 1) / m)
    assert rate(make("zbh1", p, m)) == pytest.approx((p - 1) / (3 * m))
    assert rate(make("zbv", p, m)) == pytest.approx((p - 1) * 0.5 / (3 * m))
    assert make("zbv", p, m).bubble() < make("zbh1", p, m).bubble() < make("1f1b", p, m).bubble()


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 3)])
def test_zero_bubble_keeps_one_f_one_b_activations(p, m):
    assert make("zbh1", p, m).in_flight() == one_f_one_b(p, m).in_flight()
    zbv = make("zbv", p, m)  # two stages of half a 1F1B stage each on every rank
    assert all(n / 2 <= min(p, m) for n in zbv.rank_in_flight())
    if m >= 2 * p - 1:  # a full V: every rank at 1F1B's first rank's peak
        assert zbv.rank_in_flight() == [2 * p] * p
    assert zbv.stage_rank == list(range(p)) + list(reversed(range(p)))  # the V
    # ZB-H1's rank r holds back its first r weight gradients
    assert make("zbh1", p, m).weight_pending() == [min(r + 1, m) for r in range(p)]


def test_a_weight_gradient_before_its_backward_is_rejected():
    low = lower(make("zbh1", 2, 2))
    acts = low.actions[0]
    b, w = acts.index(Action("B", 0, 0)), acts.index(Action("W", 0, 0))
    with pytest.raises(ScheduleError, match=r"rank 0 runs W0\.0 without its input-gradient backward B0\.0"):
        check(_edited(low, 0, swap=(b, w)))
    with pytest.raises(ScheduleError, match="stage 0 never runs W of microbatch 0"):
        check(_edited(low, 0, drop=w))


def test_zbv_options():
    with pytest.raises(ScheduleError, match="exactly two stages per rank"):
        make("zbv", 2, 4, 3)
    assert make("zbv", 2, 4, 2).stages == 4
