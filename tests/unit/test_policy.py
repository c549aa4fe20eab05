"""The AIMD policy: bounded, cuts on floods to 0.7x the measured rate, raises only when
saturated and quiet."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from governor.policy import AimdParams, TickInputs, decide, next_rate, params_for

P = AimdParams(min_rate=0.5, max_rate=50.0, increase_step=1.0, quiet_period_s=10, cut_cooldown_s=2)

rates = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
any_rate = st.floats(allow_nan=True, allow_infinity=True)
seconds = st.none() | st.floats(min_value=0.0, max_value=1e5, allow_nan=False)


@st.composite
def params(draw: st.DrawFn) -> AimdParams:
    low = draw(st.floats(min_value=1e-3, max_value=100))
    high = draw(st.floats(min_value=low, max_value=1e4))
    return AimdParams(
        min_rate=low,
        max_rate=high,
        decrease_factor=draw(st.floats(min_value=0.05, max_value=0.95)),
        increase_step=draw(st.floats(min_value=0, max_value=100)),
        quiet_period_s=draw(st.floats(min_value=0, max_value=600)),
        cut_cooldown_s=draw(st.floats(min_value=0, max_value=60)),
    )


@st.composite
def inputs(draw: st.DrawFn, *, in_bounds_of: AimdParams | None = None) -> TickInputs:
    if in_bounds_of is None:
        current = draw(any_rate)
    else:
        current = draw(st.floats(min_value=in_bounds_of.min_rate, max_value=in_bounds_of.max_rate))
    return TickInputs(
        current_rate=current,
        measured_rate=draw(any_rate),
        saturated=draw(st.booleans()),
        floods=draw(st.integers(min_value=0, max_value=50)),
        seconds_since_flood=draw(seconds),
        seconds_since_cut=draw(seconds),
        ceiling=draw(st.none() | st.floats(min_value=1e-3, max_value=1e4)),
    )


# --- properties ------------------------------------------------------------------------------


@given(params(), st.data())
def test_rate_always_stays_within_bounds(p: AimdParams, data: st.DataObject) -> None:
    rate = next_rate(data.draw(inputs()), p)
    assert p.min_rate <= rate <= p.max_rate
    assert math.isfinite(rate)


@given(params(), st.data())
def test_rate_never_increases_in_a_tick_with_a_flood(p: AimdParams, data: st.DataObject) -> None:
    i = data.draw(inputs(in_bounds_of=p).filter(lambda i: i.floods > 0))
    assert next_rate(i, p) <= i.current_rate


@given(params(), st.data())
def test_rate_never_increases_when_callers_did_not_wait(p: AimdParams, data: st.DataObject) -> None:
    i = data.draw(inputs(in_bounds_of=p).filter(lambda i: not i.saturated))
    assert next_rate(i, p) <= i.current_rate


def _recovery_target(i: TickInputs, p: AimdParams) -> float:
    return -math.inf if i.ceiling is None else p.clamp(i.ceiling * p.recovery_margin)


@given(params(), st.data())
def test_within_the_quiet_period_the_rate_rises_only_up_to_below_the_last_flood(
    p: AimdParams, data: st.DataObject
) -> None:
    i = data.draw(inputs(in_bounds_of=p))
    if i.seconds_since_flood is not None and i.seconds_since_flood < p.quiet_period_s:
        rate = next_rate(i, p)
        assert rate <= max(i.current_rate, _recovery_target(i, p)) + 1e-9 * p.max_rate


@given(params(), st.data())
def test_increase_is_one_step_or_a_share_of_the_way_back_below_the_last_flood(
    p: AimdParams, data: st.DataObject
) -> None:
    i = data.draw(inputs(in_bounds_of=p))
    rate = next_rate(i, p)
    target = _recovery_target(i, p)
    allowed = p.increase_step
    if rate <= target:
        allowed = max(p.increase_step, (target - i.current_rate) * p.recovery_speed)
    assert rate - i.current_rate <= allowed + 1e-9 * p.max_rate


@given(params(), st.data())
def test_above_the_recovery_target_no_raise_before_three_quiet_periods(
    p: AimdParams, data: st.DataObject
) -> None:
    i = data.draw(inputs(in_bounds_of=p).filter(lambda i: i.ceiling is not None))
    quiet = i.seconds_since_flood is None or i.seconds_since_flood >= 3 * p.quiet_period_s
    if not quiet and i.current_rate >= _recovery_target(i, p):
        assert next_rate(i, p) <= i.current_rate


@given(params(), st.data())
def test_a_cut_goes_to_the_factor_times_the_measured_rate(
    p: AimdParams, data: st.DataObject
) -> None:
    i = data.draw(inputs(in_bounds_of=p).filter(lambda i: i.floods > 0))
    d = decide(i, p)
    if d.action == "cut":
        measured = i.measured_rate if math.isfinite(i.measured_rate) else 0.0
        basis = min(i.current_rate, measured) if measured > 0 else i.current_rate
        assert d.rate == pytest.approx(max(p.min_rate, basis * p.decrease_factor))
    else:
        assert d.action == "hold" and d.rate == i.current_rate
        assert i.seconds_since_cut is not None and i.seconds_since_cut < p.cut_cooldown_s


@given(params(), st.data())
def test_the_decision_depends_only_on_its_inputs(p: AimdParams, data: st.DataObject) -> None:
    i = data.draw(inputs())
    assert decide(i, p) == decide(i, p)


# --- behaviours ------------------------------------------------------------------------------


def test_flood_cuts_to_seventy_percent_of_the_measured_rate_not_the_configured_one() -> None:
    i = TickInputs(current_rate=40, measured_rate=10, saturated=False, floods=1)
    assert next_rate(i, P) == pytest.approx(7.0)


def test_many_floods_in_one_tick_make_one_cut() -> None:
    one = TickInputs(current_rate=40, measured_rate=20, saturated=True, floods=1)
    many = TickInputs(current_rate=40, measured_rate=20, saturated=True, floods=30)
    assert next_rate(one, P) == next_rate(many, P) == pytest.approx(14.0)


def test_flood_echoes_within_the_cooldown_do_not_cut_again() -> None:
    i = TickInputs(current_rate=14, measured_rate=20, saturated=True, floods=3, seconds_since_cut=1)
    assert decide(i, P).action == "hold"
    later = TickInputs(
        current_rate=14, measured_rate=14, saturated=True, floods=1, seconds_since_cut=2.5
    )
    assert decide(later, P).rate == pytest.approx(9.8)


def test_flood_with_nothing_measured_cuts_the_current_rate() -> None:
    i = TickInputs(current_rate=10, measured_rate=0, saturated=False, floods=1)
    assert next_rate(i, P) == pytest.approx(7.0)


def test_measured_above_current_cuts_from_current() -> None:
    i = TickInputs(current_rate=10, measured_rate=13, saturated=True, floods=1)
    assert next_rate(i, P) == pytest.approx(7.0)


def test_cut_never_goes_below_min_rate() -> None:
    i = TickInputs(current_rate=0.6, measured_rate=0.1, saturated=True, floods=5)
    assert next_rate(i, P) == P.min_rate


def test_saturated_and_quiet_raises_by_one_step() -> None:
    i = TickInputs(current_rate=10, measured_rate=10, saturated=True, floods=0)
    d = decide(i, P)
    assert (d.action, d.rate) == ("raise", 11.0)
    i = TickInputs(10, 10, saturated=True, floods=0, seconds_since_flood=10.0)
    assert next_rate(i, P) == 11.0


def test_saturated_but_recently_flooded_holds() -> None:
    i = TickInputs(
        current_rate=10, measured_rate=10, saturated=True, floods=0, seconds_since_flood=9
    )
    assert decide(i, P).action == "hold"


def test_idle_bucket_is_not_raised() -> None:
    i = TickInputs(current_rate=10, measured_rate=2, saturated=False, floods=0)
    assert decide(i, P).rate == 10


def test_raise_stops_at_max_rate() -> None:
    i = TickInputs(current_rate=49.5, measured_rate=49.5, saturated=True, floods=0)
    assert next_rate(i, P) == 50.0
    d = decide(TickInputs(50, 50, saturated=True, floods=0), P)
    assert (d.action, d.rate) == ("hold", 50.0)


def test_out_of_bounds_current_rate_is_clamped() -> None:
    assert next_rate(TickInputs(1000, 0, saturated=False, floods=0), P) == 50.0
    assert next_rate(TickInputs(0, 0, saturated=False, floods=0), P) == 0.5
    assert next_rate(TickInputs(math.nan, math.nan, saturated=True, floods=1), P) == 0.5


def test_repeated_floods_settle_at_min_and_repeated_saturation_reaches_max() -> None:
    rate = 40.0
    for _ in range(30):
        rate = next_rate(TickInputs(rate, rate, saturated=True, floods=1), P)
    assert rate == P.min_rate
    for _ in range(100):
        rate = next_rate(TickInputs(rate, rate, saturated=True, floods=0), P)
    assert rate == P.max_rate


def test_a_hidden_limit_drop_settles_in_two_cuts() -> None:
    """Rate 20/s, hidden limit drops to 12/s: 0.7x measured twice is below it."""
    rate, cuts, since_cut = 20.0, 0, None
    for _ in range(10):
        flooded = rate > 12
        d = decide(
            TickInputs(
                rate,
                rate,
                saturated=True,
                floods=int(flooded),
                seconds_since_flood=0,
                seconds_since_cut=since_cut,
            ),
            P,
        )
        cuts += d.action == "cut"
        since_cut = 0.0 if d.action == "cut" else (since_cut or 0) + 1.0
        rate = d.rate
    assert rate <= 12 and cuts <= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_rate": 0, "max_rate": 1},
        {"min_rate": 2, "max_rate": 1},
        {"min_rate": 1, "max_rate": math.inf},
        {"min_rate": 1, "max_rate": 2, "decrease_factor": 1.0},
        {"min_rate": 1, "max_rate": 2, "increase_step": -1},
        {"min_rate": 1, "max_rate": 2, "quiet_period_s": -1},
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AimdParams(**kwargs)


def test_params_for_scales_the_step_with_the_configured_rate() -> None:
    history = params_for(10.0, min_rate=0.05, max_rate=100, increase_fraction=0.05)
    resolve = params_for(0.33, min_rate=0.05, max_rate=100, increase_fraction=0.05)
    assert history.increase_step == pytest.approx(0.5)
    assert resolve.increase_step == pytest.approx(0.0165)
    assert params_for(0.01, min_rate=0.05, max_rate=100).min_rate == 0.01


def test_after_a_cut_the_rate_climbs_back_fast_to_just_below_the_flood_and_cruises() -> None:
    p = AimdParams(
        min_rate=0.5, max_rate=100, increase_step=0.5, quiet_period_s=10, cut_cooldown_s=2
    )
    rate = decide(TickInputs(24.0, 24.0, True, floods=2), p).rate
    assert rate == pytest.approx(16.8)  # 0.7 x the measured 24/s
    steps = []
    for t in range(3, 9):  # saturated ticks, one per second, no new flood
        rate = decide(TickInputs(rate, rate, True, 0, float(t), float(t), ceiling=24.0), p).rate
        steps.append(round(rate, 2))
    target = p.recovery_margin * 24
    assert steps[0] == pytest.approx(16.8 + (target - 16.8) / 2, abs=0.01)  # half way back
    assert target - 0.1 < steps[-1] <= target + 0.01  # recovered within a few seconds (rounded)
    cruise = decide(TickInputs(target, target, True, 0, 20.0, 20.0, ceiling=24.0), p)
    assert cruise.action == "hold"  # below the last flood, not closing in on it


def test_above_the_cruise_the_rate_probes_only_after_three_quiet_periods() -> None:
    p = AimdParams(
        min_rate=0.5, max_rate=100, increase_step=0.5, quiet_period_s=10, cut_cooldown_s=2
    )
    cruise = p.recovery_margin * 24
    held = decide(TickInputs(cruise, cruise, True, 0, 29.0, 29.0, ceiling=24.0), p)
    assert held.action == "hold"
    later = decide(TickInputs(cruise, cruise, True, 0, 31.0, 31.0, ceiling=24.0), p)
    assert later.action == "raise" and later.rate == pytest.approx(cruise + 0.5)  # limit may rise


def test_after_a_flood_below_the_old_ceiling_the_rate_climbs_one_step_per_tick() -> None:
    p = AimdParams(min_rate=0.5, max_rate=50.0, increase_step=1.0)
    fast = TickInputs(10, 10, saturated=True, floods=0, seconds_since_cut=3.0, ceiling=20.0)
    slow = TickInputs(
        10, 10, saturated=True, floods=0, seconds_since_cut=3.0, ceiling=20.0, ceiling_suspect=True
    )
    assert next_rate(fast, p) == pytest.approx(10 + (20 * p.recovery_margin - 10) * 0.5)
    d = decide(slow, p)
    assert d.action == "raise" and d.rate == pytest.approx(11.0) and "limit fell" in d.why


# --- learning each account's limit and the fleet's apart (issue 10) -------------------------

from dataclasses import replace  # noqa: E402

from governor.policy import FloodSeen, attribute, window_estimate  # noqa: E402


def test_the_window_estimate_of_a_burst_from_idle_is_exactly_k_per_w() -> None:
    # 30 requests per 30 s, sent at 1.2/s from idle: the 31st, at 25 s, is told to wait 5 s.
    assert window_estimate(30, 25.0, 5.0) == pytest.approx(1.0)
    # 20 per 2 s sent at 50/s: flooded after 0.4 s, told to wait what is left of the window.
    assert window_estimate(20, 0.4, 1.6) == pytest.approx(10.0)
    assert window_estimate(0, 3.0, 1.0) == 0.0
    assert window_estimate(5, 0.0, 0.0) == 0.0


def flood(
    at: float, session: str, own_rate: float = 5.0, own_limit: float | None = None
) -> FloodSeen:
    return FloodSeen(at, session, 1.0, own_rate=own_rate, own_limit=own_limit)


def test_a_lone_flood_belongs_to_its_account() -> None:
    assert attribute([flood(10.0, "a")], [], shared_window_s=0.5, fleet_shared=False) == [False]


def test_floods_of_two_accounts_within_the_window_are_shared_evidence() -> None:
    floods = [flood(10.0, "a"), flood(10.2, "b")]
    assert attribute(floods, [], shared_window_s=0.5, fleet_shared=False) == [True, True]
    # The first of them was read a tick earlier: it still counts as company.
    assert attribute([flood(10.2, "b")], [flood(10.0, "a")], shared_window_s=0.5,
                     fleet_shared=False) == [True]  # fmt: skip
    # Too far apart: two accounts' own limits.
    far = [flood(10.0, "a"), flood(11.0, "b")]
    assert attribute(far, [], shared_window_s=0.5, fleet_shared=False) == [False, False]
    # The same account twice is no company.
    same = [flood(10.0, "a"), flood(10.1, "a")]
    assert attribute(same, [], shared_window_s=0.5, fleet_shared=False) == [False, False]


def test_an_account_running_at_its_own_learned_limit_explains_its_flood() -> None:
    at_limit = flood(10.0, "a", own_rate=9.5, own_limit=10.0)
    below = flood(10.1, "b", own_rate=4.0, own_limit=10.0)
    # a is at its own limit: its flood is its own, and it is no company for b's.
    assert attribute([at_limit, below], [], shared_window_s=0.5, fleet_shared=False) == [
        False,
        False,
    ]
    # A lone flood is its account's, even below a limit it learned and once a shared limit is
    # known to bind: its own limit, learned too high, explains it as well, and taking it for
    # the shared one would slow every account to that one's pace.
    assert attribute([below], [], shared_window_s=0.5, fleet_shared=True) == [False]
    assert attribute([flood(10.0, "c")], [], shared_window_s=0.5, fleet_shared=True) == [False]


def test_a_lone_flood_while_the_fleet_probes_is_the_probes_answer() -> None:
    # The fleet stepped above its cruise and one account flooded: the probe found the shared
    # limit (it ended at once, so no second account floods to keep this one company).
    probed = replace(flood(10.0, "a"), probe=True)
    assert attribute([probed], [], shared_window_s=0.5, fleet_shared=False) == [True]
    # Unless the account runs at its own learned limit: that explains it, probe or not.
    at_limit = replace(flood(10.0, "a", own_rate=9.5, own_limit=10.0), probe=True)
    assert attribute([at_limit], [], shared_window_s=0.5, fleet_shared=False) == [False]


def test_a_far_slower_account_flooding_with_the_others_is_no_evidence_of_a_shared_limit() -> None:
    # An account 5x slower than its fleet-mates, flooding together with one of them: each
    # meets its own limit (a shared window refuses whoever sends next, mostly the fast).
    slow, fast = flood(10.0, "slow", own_rate=2.0), flood(10.1, "fast", own_rate=9.0)
    assert attribute([slow, fast], [], shared_window_s=0.5, fleet_shared=False) == [False, False]
    # Comparable rates keep each other company.
    near = flood(10.1, "fast", own_rate=4.0)
    assert attribute([slow, near], [], shared_window_s=0.5, fleet_shared=False) == [True, True]


def test_bursts_are_compared_on_their_company_rate_not_their_own_span() -> None:
    # Two accounts each sent ten requests within a few ms and were refused together: over
    # their own spans they read 1013/s and 270/s (scheduling, not the accounts); compared over
    # at least the shared-flood window, both sent 20/s.
    a = replace(flood(10.0, "a", own_rate=1013.0), company_rate=20.0)
    b = replace(flood(10.001, "b", own_rate=270.0), company_rate=20.0)
    assert attribute([a, b], [], shared_window_s=0.5, fleet_shared=False) == [True, True]
    # Without the company rate the same pair reads as a slow account and a fast one.
    bare = [replace(a, company_rate=None), replace(b, company_rate=None)]
    assert attribute(bare, [], shared_window_s=0.5, fleet_shared=False) == [False, False]


def test_window_floods_of_accounts_that_never_learned_a_limit_are_their_own() -> None:
    # Two alike accounts fill their own 30-per-30 s windows at the same moment (N = 16 s).
    a = FloodSeen(10.0, "a", 16.0, own_rate=2.0, own_limit=None)
    b = FloodSeen(10.1, "b", 16.0, own_rate=2.0, own_limit=None)
    assert attribute([a, b], [], shared_window_s=0.5, fleet_shared=False,
                     window_wait_s=3.0) == [False, False]  # fmt: skip
    # Short N: rate-type limits, two accounts together are company as before.
    short = [replace(a, wait_s=1.0), replace(b, wait_s=1.0)]
    assert attribute(short, [], shared_window_s=0.5, fleet_shared=False,
                     window_wait_s=3.0) == [True, True]  # fmt: skip
    # Accounts that learned their own limit and flood well below it: shared, N or not.
    below = [replace(a, own_limit=6.0), replace(b, own_limit=6.0)]
    assert attribute(below, [], shared_window_s=0.5, fleet_shared=False,
                     window_wait_s=3.0) == [True, True]  # fmt: skip


def test_floods_of_accounts_their_own_buckets_paced_are_their_own_until_they_learn_one() -> None:
    # Two accounts slow-starting their own buckets (the fleet bucket pacing neither) meet their
    # own limits together: each flood is its account's, and no company for the other's.
    a = replace(flood(10.0, "a"), own_paced=True)
    b = replace(flood(10.1, "b"), own_paced=True)
    assert attribute([a, b], [], shared_window_s=0.5, fleet_shared=False) == [False, False]
    assert attribute([flood(10.1, "c")], [a], shared_window_s=0.5, fleet_shared=False) == [False]
    # Once each learned its own limit, the rate says: far below it together is shared.
    below = [replace(a, own_limit=10.0), replace(b, own_limit=10.0)]
    assert attribute(below, [], shared_window_s=0.5, fleet_shared=False) == [True, True]
    # Not paced by their own buckets (the fleet's paced them): company, as before.
    assert attribute([flood(10.0, "a"), flood(10.1, "b")], [], shared_window_s=0.5,
                     fleet_shared=False) == [True, True]  # fmt: skip


def test_a_limit_read_on_a_burst_from_idle_does_not_make_the_next_own_paced_flood_shared() -> None:
    # Two alike accounts learned 12.8/s and 11.4/s on their first bursts (each began sending
    # inside the measuring window); their own limit is 9/s, and they flood there together
    # while their own buckets pace them and the fleet bucket does not: their own, not shared.
    a = replace(flood(10.0, "a", own_rate=9.0, own_limit=12.8), own_paced=True)
    b = replace(flood(10.1, "b", own_rate=9.0, own_limit=11.4), own_paced=True)
    burst = [replace(a, limit_from_burst=True), replace(b, limit_from_burst=True)]
    assert attribute(burst, [], shared_window_s=0.5, fleet_shared=False) == [False, False]
    # Learned over a whole measuring window, the same limits are the limits: far below them
    # together is a shared limit.
    assert attribute([a, b], [], shared_window_s=0.5, fleet_shared=False) == [True, True]
    # Not paced by their own buckets (the fleet's paced them): the rate decides, as before.
    fleet_paced = [replace(f, own_paced=False) for f in burst]
    assert attribute(fleet_paced, [], shared_window_s=0.5, fleet_shared=False) == [True, True]


def test_a_bucket_that_never_flooded_grows_by_the_slow_start_factor() -> None:
    p = replace(P, slow_start_factor=1.25)
    grown = decide(TickInputs(4.0, 4.0, True, 0), p)
    assert grown.action == "raise" and grown.rate == pytest.approx(5.0)
    # From 5x too low to the configured rate within 8 ticks.
    rate = 1.0
    for _ in range(8):
        rate = next_rate(TickInputs(rate, rate, True, 0), p)
    assert rate >= 5.0
    # Not while idle, and never once a flood has set a ceiling.
    assert decide(TickInputs(4.0, 1.0, False, 0), p).action == "hold"
    after = decide(TickInputs(8.0, 8.0, True, 0, 100.0, 100.0, ceiling=8.0), p)
    assert after.rate == pytest.approx(9.0)  # one additive probe step, not x 1.25


def test_probing_grows_by_the_probe_factor_after_the_probe_quiet() -> None:
    p = replace(P, probe_quiet_s=5.0, probe_factor=1.1)
    cruising = TickInputs(20.0, 20.0, True, 0, 4.0, 4.0, ceiling=20.5)
    assert decide(cruising, p).action == "hold"
    probe = decide(replace(cruising, seconds_since_flood=5.0, seconds_since_cut=5.0), p)
    assert probe.action == "raise" and probe.rate == pytest.approx(22.0)


def test_relative_steps_scale_with_the_current_rate() -> None:
    p = replace(P, increase_step=0.1, relative_step=0.05)
    assert p.step(100.0) == pytest.approx(5.0)
    assert p.step(1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        replace(P, relative_step=1.5)
    with pytest.raises(ValueError):
        replace(P, slow_start_factor=0.5)


def test_a_flood_below_a_pace_its_account_kept_without_one_is_shared_evidence() -> None:
    # a sent 10/s without a flood within the last 20 s, and is refused at 2.5/s: whatever
    # refused it, it was not its own limit, even alone and with an own limit learned at 3/s.
    lone = replace(flood(10.0, "a", own_rate=2.5, own_limit=3.0), sustained=10.0, fleet_paced=True)
    assert attribute([lone], [], shared_window_s=0.5, fleet_shared=False) == [True]
    # With the fleet bucket idle, no shared limit was near: the account's own limit fell.
    idle = replace(lone, fleet_paced=False)
    assert attribute([idle], [], shared_window_s=0.5, fleet_shared=False) == [False]
    # Refused at 0.8x of that pace or faster, it may be its own (an own window allows a
    # burst over one measuring window that a steady pace does not keep).
    near = replace(lone, own_rate=8.0)
    assert attribute([near], [], shared_window_s=0.5, fleet_shared=False) == [False]
    # It keeps another account company like any account below its own limit.
    other = flood(10.2, "b", own_rate=3.0, own_limit=3.0)
    assert attribute([lone, other], [], shared_window_s=0.5, fleet_shared=False) == [True, False]
    # A window-type flood (long N) says what its own window holds, not its pace.
    long_n = replace(lone, wait_s=16.0, own_limit=None)
    assert attribute([long_n], [], shared_window_s=0.5, fleet_shared=False,
                     window_wait_s=3.0) == [False]  # fmt: skip
