"""What the fleet really sent: rates measured from the bucket's counter samples (pure, no I/O).

The leader reads the counters hash every ``COUNTER_SAMPLE_S`` and at each tick
(:class:`fleet.bucket.Counters`, stamped with Redis time); the controller keeps the last
``HISTORY_S`` of them in a deque and asks this module two questions: the rate over exactly the
last ``MEASURE_WINDOW_S`` (what a cut is a fraction of), and where the burst that filled a
window-type limit began (what :func:`governor.policy.window_estimate` divides by).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from fleet.bucket import Counters

#: Rates are measured over this long (ANCHORS: "0.7× the rate measured over 1–2 s").
MEASURE_WINDOW_S = 2.0
#: Between ticks the leader samples the counters this often, so the measured window starts
#: where it should (a flood's measurement must not reach back into a hold or a ramp-up).
COUNTER_SAMPLE_S = 0.25
#: How far back the counter samples go: a window-type limit (K per W s) is measured over the
#: time since its window last freed, up to this long.
HISTORY_S = 90.0


def keep(samples: deque[Counters], now: Counters) -> None:
    """Add ``now`` and drop what is older than ``HISTORY_S`` (keeping one sample before it, so
    a window reaching exactly that far back still has its start)."""
    samples.append(now)
    while len(samples) > 2 and samples[1].at_s <= now.at_s - HISTORY_S:
        samples.popleft()


def measured(
    samples: Sequence[Counters],
    now: Counters,
    name: str,
    *,
    less: int = 0,
    window_s: float = MEASURE_WINDOW_S,
) -> float:
    """Per second over exactly the last ``window_s`` (or since the oldest sample), not
    counting ``less`` of the requests in it (those Telegram refused).

    Samples come once a tick and at each flood, so the counter's value at the window's
    start is interpolated between the two samples around it: a window that is really
    1–2 ticks long would mix in a hold or a rate of before the last change.
    """
    start = max(samples[0].at_s, now.at_s - window_s)
    before = samples[0]
    value = float(before.get(name))
    for sample in samples:
        if sample.at_s <= start:
            before = sample
            value = float(sample.get(name))
            continue
        dt = sample.at_s - before.at_s
        share = (start - before.at_s) / dt if dt > 0 else 1.0
        value = before.get(name) + (sample.get(name) - before.get(name)) * share
        break
    start = _skip_idle_start(samples, name, start, value)
    span = now.at_s - start
    if span <= 0:
        return 0.0
    return max(0.0, now.get(name) - value - less) / span


def _skip_idle_start(samples: Sequence[Counters], name: str, start: float, value: float) -> float:
    """A fleet that only just began (idle for a whole window before the first request in
    this one) is measured from the last sample before the counter moved, or one starting
    at 30/s reads as 20/s. A pause after work (a hold) stays in: the window admitted it."""
    earlier = [x for x in samples if x.at_s <= start - MEASURE_WINDOW_S]
    reference = earlier[-1] if earlier else samples[0]
    if reference.get(name) >= value:
        for sample in samples:
            if sample.at_s <= start:
                continue
            if sample.get(name) > value:
                break
            start = sample.at_s
    return start


def burst_start(samples: Sequence[Counters], name: str, start_s: float) -> Counters:
    """The sample a burst counted from ``start_s`` on is measured from: the last one at or
    before ``start_s``, moved on to where the counter first rose (idle time before the burst
    is not the window)."""
    before = samples[0]
    for sample in samples:
        if sample.at_s > start_s:
            break
        before = sample
    for sample in samples:
        if sample.at_s <= before.at_s:
            continue
        if sample.get(name) > before.get(name):
            break
        before = sample
    return before


def got_through_before(
    bookings: Sequence[float],
    *,
    refused: int = 0,
    window_s: float = MEASURE_WINDOW_S,
    min_span_s: float = 0.0,
) -> float | None:
    """One account's rate when Telegram refused its request, from its admits' send times
    (``bookings``, s, ascending; the last is the refused request): what got through in exactly
    the ``window_s`` before it (``refused`` of them were refused too), per second. For a window
    of K requests per W = ``window_s`` this is K / W: the window was full.

    Measured on the counters over the window ending at the tick instead, the same account read
    7.8–8.0/s against 17 per 2 s (8.5/s): the pause after the flood, the pacing gap and the
    counter samples each took a little off, and it cruised at 90% of its limit. None when the
    log says too little (fewer than two requests). ``min_span_s``: an account that began inside
    the window is measured over at least this long (a burst of requests sent within a few ms
    reads any rate at all, depending only on how the sender was scheduled)."""
    if len(bookings) < 2:
        return None
    last = bookings[-1]
    since = last - window_s
    inside = [b for b in bookings[:-1] if b >= since]
    span = window_s
    if len(inside) == len(bookings) - 1 and inside:
        # It began sending inside the window: measured from its first request (n requests
        # and the refused one after them take n gaps).
        span = min(window_s, max(min_span_s, last - inside[0]))
    if span <= 0:
        return None
    return max(0, len(inside) - refused) / span


def per_s(now: Counters, base: Counters, name: str) -> float:
    """The counter's rate between two readings (0 if they are not apart in time)."""
    dt = now.at_s - base.at_s
    return max(0, now.get(name) - base.get(name)) / dt if dt > 0 else 0.0


def sustained(
    bookings: Sequence[float],
    floods_at: Sequence[float],
    *,
    lookback_s: float,
    window_s: float = MEASURE_WINDOW_S,
    refused_lag_s: float = 0.5,
) -> float | None:
    """The highest rate one account sent without a flood over any ``window_s`` (measured as
    :func:`got_through_before` measures it) in the ``lookback_s`` before its last admit
    (``bookings``, s, ascending; the last is the refused request), leaving out every window
    that held one of its earlier refused requests (``floods_at``: when each of its FloodWaits
    was recorded, up to ``refused_lag_s`` after the request went out). None when no window
    fits. A window that reaches back before the first logged admit counts what is logged, so
    the rate is never read higher than what was sent."""
    if len(bookings) < 2:
        return None
    last = bookings[-1]
    best: float | None = None
    first = 0
    for i, end in enumerate(bookings[:-1]):
        if end < last - lookback_s:
            continue
        start = end - window_s
        if any(start <= f <= end + refused_lag_s for f in floods_at):
            continue
        while bookings[first] <= start:
            first += 1
        rate = (i - first + 1) / window_s
        best = rate if best is None else max(best, rate)
    return best
