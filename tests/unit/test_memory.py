"""An account's learned window, probed shorter and taken back (pure memory, no Redis)."""

from __future__ import annotations

import pytest

from governor.memory import MAX_PROBE_BACKOFF, WINDOW_PROBE_STEP, BucketMemory, cut
from governor.policy import Decision


def windowed(k: int = 31, w: float = 3.9) -> BucketMemory:
    return BucketMemory(window_set=(k, w), last_flood_s=100.0)


def test_a_window_is_probed_only_when_full_and_after_a_quiet_period_of_two_windows() -> None:
    m = windowed()
    assert m.window_probe(105.0, full=True, quiet_s=5.0) is None  # 5 s < 2 W = 7.8 s
    assert m.window_probe(108.0, full=False, quiet_s=5.0) is None  # the window does not bind
    assert m.window_set == (31, 3.9)
    probe = m.window_probe(108.0, full=True, quiet_s=5.0)
    assert probe == (31, pytest.approx(3.9 * WINDOW_PROBE_STEP))
    assert m.window_set == probe and m.window_probe_from == (31, 3.9)
    # One step at a time: no second step while the first is watched.
    assert m.window_probe(200.0, full=True, quiet_s=5.0) is None


def test_a_probe_that_floods_goes_back_and_the_next_one_splits_the_difference() -> None:
    m = windowed(31, 4.0)
    assert m.window_probe(110.0, full=True, quiet_s=5.0) == (31, pytest.approx(3.6))
    assert m.window_probe_flooded(109.0) is None  # a flood from before the step says nothing
    assert m.window_probe_flooded(111.0) == (31, 4.0)
    assert m.window_set == (31, 4.0) and m.window_too_short == pytest.approx(3.6)
    assert m.window_answered_s == 111.0 and m.window_backoff == 2.0
    assert m.window_probe_flooded(112.0) is None  # not probing any more
    # The next probe waits the doubled quiet (2 x 5 s) after the step, then takes the middle.
    m.last_flood_s = 111.0
    assert m.window_probe(119.0, full=True, quiet_s=5.0) is None
    assert m.window_probe(121.5, full=True, quiet_s=5.0) == (31, pytest.approx(3.8))
    # Two of its windows without a flood: it holds, and it is the window from now on.
    m.window_probe_held(121.5 + 7.0)
    assert m.window_probe_from == (31, 4.0)
    m.window_probe_held(121.5 + 7.7)
    assert m.window_probe_from is None and m.window_set == (31, pytest.approx(3.8))
    # Halfway between 3.8 and 3.6 is within 3% of 3.8: probing has converged.
    assert m.window_probe(1000.0, full=True, quiet_s=5.0) is None


def test_probe_floods_back_off_up_to_the_cap() -> None:
    m = windowed(10, 2.0)
    for i in range(6):
        now = 200.0 + 100 * i
        m.window_too_short = None
        assert m.window_probe(now, full=True, quiet_s=1.0) is not None
        assert m.window_probe_flooded(now + 0.5) == (10, 2.0)
    assert m.window_backoff == MAX_PROBE_BACKOFF


def test_a_long_window_is_probed_by_half_a_second_at_most_and_not_past_the_gap() -> None:
    # 8 s: one step of 0.5 s (not 0.8 s); 30 s: 0.5 s is within 3%, N's rounding costs less.
    assert windowed(20, 8.0).window_probe(200.0, full=True, quiet_s=5.0) == (20, 7.5)
    assert windowed(30, 30.0).window_probe(200.0, full=True, quiet_s=5.0) is None


def test_no_window_no_probe() -> None:
    m = BucketMemory()
    assert m.window_probe(0.0, full=True, quiet_s=0.0) is None
    assert m.window_probe_flooded(1.0) is None
    m.window_probe_held(10.0)
    assert m.window_set is None


def _cruising_account() -> BucketMemory:
    """An account that learned 8/s and cruises a margin below it, quiet for 20 s."""
    return BucketMemory(last_flood_s=0.0, last_cut_s=0.0, ceiling=8.0, streak=1)


@pytest.mark.parametrize("probe_answer", [False, True])
def test_an_own_flood_during_a_fleet_probe_is_a_limit_met_not_a_fallen_one(
    probe_answer: bool,
) -> None:
    m = _cruising_account()
    policy = Decision(0.7 * 7.5, "cut", "1 flood(s); measured 7.5/s")
    got = cut(
        m, policy, now_s=20.0, current=0.97 * 8.0, measured=7.5, estimate=0.0, wait_s=1.0,
        margin=0.97, quiet_s=10.0, decrease_factor=0.7, probe_answer=probe_answer,
    )  # fmt: skip
    assert m.ceiling == pytest.approx(7.5)
    if probe_answer:
        # The cruise a margin below what it sent, and no step-by-step climb.
        assert not m.suspect and got.rate == pytest.approx(0.97 * 7.5)
        assert "straight to the cruise" in got.why
    else:
        # Cruising below its ceiling, it flooded: the limit fell, the policy's deep cut stands.
        assert m.suspect and got.rate == pytest.approx(0.7 * 7.5)


def test_a_probe_that_met_only_own_limits_cruises_below_the_last_step_that_held() -> None:
    m = BucketMemory(ceiling=20.0, streak=1, last_flood_s=0.0, last_cut_s=0.0)
    m.probed(10.0, 19.4)  # the first step, from the cruise: nothing held yet
    assert m.probe_held is None
    m.probed(12.0, 21.3)  # the second: the first step (21.3/s) held for 2 s
    m.probed(14.0, 25.6)  # the third: so did the second
    assert m.probe_held == 25.6
    m.probe_from = 35.8  # the third step's flood ended the probe
    # Judged: every flood of the probe was an account's own. A margin below the last step
    # that held, and that step is the ceiling now; the next probe waits as after any other.
    assert m.probe_judged(15.0, shared=False, margin=0.97) == pytest.approx(0.97 * 25.6)
    assert m.ceiling == 25.6 and m.probe_held is None and m.probe_backoff == 2.0
    assert m.probe_judged(16.0, shared=False, margin=0.97) is None  # judged once


@pytest.mark.parametrize("shared", [True, False])
def test_a_probe_that_met_a_shared_limit_or_held_no_step_keeps_its_ceiling(shared: bool) -> None:
    m = BucketMemory(ceiling=20.0, streak=1, last_flood_s=0.0, last_cut_s=0.0)
    m.probed(10.0, 19.4)
    if shared:
        m.probed(12.0, 21.3)
    m.probe_from = 25.6
    assert m.probe_judged(15.0, shared=shared, margin=0.97) is None
    assert m.ceiling == 20.0 and m.probe_held is None


def test_each_cut_of_a_streak_takes_twice_the_margins_of_the_one_before() -> None:
    """A limit that fell 40%: the first flood (at the cruise that held) gets the policy's deep
    cut; each later flood within the quiet period goes straight to a cruise below what it
    measured, 1, 3, 7 margins below (the policy's own 0.7x cut is the floor)."""
    m = BucketMemory(ceiling=24.0, streak=1, last_flood_s=0.0, last_cut_s=0.0)
    at, current, got = 30.0, 0.97 * 24.0, []
    for measured in (23.0, 16.0, 15.0, 14.0, 13.0):
        policy = Decision(0.7 * min(current, measured), "cut", f"measured {measured}")
        decision = cut(
            m, policy, now_s=at, current=current, measured=measured, estimate=0.0,
            wait_s=1.0, margin=0.97, quiet_s=10.0, decrease_factor=0.7,
        )  # fmt: skip
        got.append((m.streak, decision.rate))
        at, current = at + 3.0, decision.rate
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    rates = [r for _, r in got]
    assert rates[0] == pytest.approx(0.7 * 23.0)  # the limit fell: the policy's cut
    assert rates[1] == pytest.approx(0.97**2 * 16.0)
    assert rates[2] == pytest.approx(0.97**4 * 15.0)
    assert rates[3] == pytest.approx(0.97**8 * 0.97**4 * 15.0)  # never above the rate it had
    assert rates[4] == pytest.approx(0.7 * rates[3])  # 0.97**16 < 0.7: the policy's cut
