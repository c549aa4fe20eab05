"""What an account sent when Telegram refused it, from its admits' send times (pure)."""

from __future__ import annotations

import pytest

from governor.measure import got_through_before, sustained


def paced(rate: float, seconds: float, start: float = 100.0) -> list[float]:
    n = int(seconds * rate)
    return [start + i / rate for i in range(n + 1)]


def test_a_full_window_of_k_per_w_reads_k_over_w() -> None:
    # Cruising at 8 /s, then paced at 8.7/s into a window of 17 per 2 s: the request refused
    # is the one with 17 in the 2 s before it.
    before = paced(8.0, 5.0, start=95.0)
    log = before[:-1] + paced(8.7, 10.0)
    at = next(i for i in range(17, len(log)) if log[i] - log[i - 17] < 2.0)
    bookings = log[: at + 1]
    assert sum(1 for b in bookings[:-1] if b >= bookings[-1] - 2.0) == 17
    assert got_through_before(bookings) == pytest.approx(17 / 2.0)


def test_requests_refused_earlier_in_the_window_do_not_count() -> None:
    bookings = paced(5.0, 4.0)
    assert got_through_before(bookings) == pytest.approx(5.0)
    assert got_through_before(bookings, refused=2) == pytest.approx(4.0)


def test_an_account_that_began_inside_the_window_is_measured_from_its_first_request() -> None:
    # Ten requests 0.1 s apart, then the refused one: 10/s, not 10 per 2 s.
    bookings = [100.0 + i / 10 for i in range(11)]
    assert got_through_before(bookings) == pytest.approx(10.0)


def test_too_little_to_say_is_none() -> None:
    assert got_through_before([]) is None
    assert got_through_before([100.0]) is None
    assert got_through_before([100.0, 100.0]) is None


def test_a_burst_sent_within_a_few_ms_is_measured_over_at_least_min_span() -> None:
    # Ten requests within 10 ms, then the refused one: over their own span any rate at all
    # (here 1000/s); over at least 0.5 s, 20/s, however the sender was scheduled.
    bookings = [100.0 + i / 1000 for i in range(11)]
    assert got_through_before(bookings) == pytest.approx(1000.0)
    assert got_through_before(bookings, min_span_s=0.5) == pytest.approx(20.0)
    # A span already longer than the floor is measured as before.
    slow = [100.0 + i / 10 for i in range(11)]
    assert got_through_before(slow, min_span_s=0.5) == pytest.approx(10.0)


def test_the_pace_an_account_kept_is_its_fastest_window_without_a_flood() -> None:
    fast = [100.0 + i * 0.125 for i in range(24)]  # 8/s for 3 s
    slow = [103.5 + i * 0.5 for i in range(5)]  # then 2/s; the last (105.5) is refused
    bookings = fast + slow
    assert sustained(bookings, [], lookback_s=20.0) == pytest.approx(8.0)
    # Windows holding an earlier refused request (recorded up to 0.5 s after it) are left
    # out: the fastest left is (101.5, 103.5], 11 fast and 1 slow.
    assert sustained(bookings, [101.0], lookback_s=20.0) == pytest.approx(12 / 2.0)
    # Only the lookback before the refused request counts: (103, 105], four slow ones.
    assert sustained(bookings, [], lookback_s=0.75) == pytest.approx(4 / 2.0)
    # Too little logged: nothing to say.
    assert sustained([100.0], [], lookback_s=20.0) is None
    assert sustained([100.0, 101.0], [100.5], lookback_s=20.0) is None
