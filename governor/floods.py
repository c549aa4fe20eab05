"""The FloodWaits the controller has read from the flood stream, and which limit each is about.

Workers append each FloodWait to the stream ``keys.floods`` (class, session, N). The leader
reads what is new each tick, holds every flood back until ``SHARED_FLOOD_WINDOW_S`` has passed
(the first of several sessions' floods into one full shared window would otherwise be read
alone and taken for its account's own), then lets :func:`governor.policy.attribute` judge it
shared (evidence about the fleet bucket) or own (about that session's bucket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from fleet.bucket import SHARED_FLOOD_WINDOW_S
from fleet.scripts import text
from governor.measure import MEASURE_WINDOW_S
from governor.memory import WINDOW_WAIT_S
from governor.policy import SUSTAINED_LOOKBACK_S, FloodSeen, attribute

#: One flood as read from the stream: (Redis time s, session, N seconds).
RawFlood = tuple[float, str, float]


@dataclass
class FloodLog:
    """Where the stream was read up to, and the floods of each class judged or waiting."""

    _flood_id: str | None = None  # the last flood stream entry read
    _recent: dict[str, list[FloodSeen]] = field(default_factory=dict)  # judged, per class
    _pending: dict[str, list[FloodSeen]] = field(default_factory=dict)  # not yet judged
    #: Every flood read, per class, for ``SUSTAINED_LOOKBACK_S`` and a measuring window more.
    _history: dict[str, list[RawFlood]] = field(default_factory=dict)

    def reset(self) -> None:
        """Start over from the stream's end (a new term as leader judges only new floods)."""
        self._flood_id = None
        self._recent.clear()
        self._pending.clear()
        self._history.clear()

    async def read(self, redis: Redis, key: str) -> dict[str, list[RawFlood]]:
        """FloodWaits recorded since the last read, per class: (Redis time s, session, N)."""
        out: dict[str, list[RawFlood]] = {}
        if self._flood_id is None:
            newest = await redis.xrevrange(key, count=1)
            self._flood_id = text(newest[0][0]) if newest else "0-0"
            return out
        entries = await redis.xrange(key, min=f"({self._flood_id}", count=1000) or []
        for entry_id, raw in entries:
            self._flood_id = text(entry_id)
            f = {text(k): text(v) for k, v in (raw or {}).items()}
            try:
                seconds = float(f.get("seconds") or 0)
            except ValueError:
                seconds = 0.0
            at_s = int(self._flood_id.split("-")[0]) / 1000
            out.setdefault(f.get("class", ""), []).append((at_s, f.get("session", ""), seconds))
        for c, new in out.items():
            keep_from = new[-1][0] - SUSTAINED_LOOKBACK_S - 2 * MEASURE_WINDOW_S
            self._history[c] = [e for e in [*self._history.get(c, []), *new] if e[0] >= keep_from]
        return out

    def flood_times(self, c: str, session: str) -> list[float]:
        """When each flood of ``session`` and class ``c`` read in the last
        ``SUSTAINED_LOOKBACK_S`` (and a little more) was recorded."""
        return [e[0] for e in self._history.get(c, []) if e[1] == session]

    def resumed_at(self, c: str, session: str, before_s: float) -> float | None:
        """When the pause that ``session``'s last flood of class ``c`` before ``before_s``
        asked for (the flood + its N) ended; None if none was read lately."""
        ends = [
            e[0] + e[2] for e in self._history.get(c, []) if e[1] == session and e[0] < before_s
        ]
        return max(ends, default=None)

    def pending_sessions(self, c: str) -> set[str]:
        """Sessions with a flood of class ``c`` read but not judged yet."""
        return {f.session for f in self._pending.get(c, [])}

    def refused(self, c: str, events: list[RawFlood], *, since_s: float) -> list[RawFlood]:
        """The floods of class ``c`` known so far (judged, waiting, and ``events`` just read)
        from ``since_s`` on: requests the bucket admitted that Telegram refused."""
        known = [(f.at_s, f.session, f.wait_s) for f in self._recent.get(c, [])]
        known += [(f.at_s, f.session, f.wait_s) for f in self._pending.get(c, [])]
        return [e for e in [*known, *events] if e[0] >= since_s]

    def judge(
        self,
        c: str,
        now_s: float,
        events: list[RawFlood],
        seen: Callable[[RawFlood], FloodSeen],
        *,
        fleet_shared: bool,
    ) -> tuple[list[FloodSeen], dict[str, list[FloodSeen]]]:
        """Split the floods of class ``c`` old enough to judge into shared evidence and each
        session's own.

        ``seen`` measures each new flood as it comes in (the rates at the flood, not after the
        pause). A flood is judged once ``SHARED_FLOOD_WINDOW_S`` has passed since it (the next
        tick); its session is paused meanwhile.
        """
        pending = self._pending.setdefault(c, [])
        pending.extend(seen(event) for event in events)
        ready = [f for f in pending if f.at_s <= now_s - SHARED_FLOOD_WINDOW_S]
        self._pending[c] = [f for f in pending if f.at_s > now_s - SHARED_FLOOD_WINDOW_S]
        recent = [f for f in self._recent.get(c, []) if f.at_s >= now_s - 4 * MEASURE_WINDOW_S]
        flags = attribute(
            ready,
            [*recent, *self._pending[c]],
            shared_window_s=SHARED_FLOOD_WINDOW_S,
            fleet_shared=fleet_shared,
            window_wait_s=WINDOW_WAIT_S,
        )
        self._recent[c] = [*recent, *ready]
        shared = [f for f, is_shared in zip(ready, flags, strict=True) if is_shared]
        own: dict[str, list[FloodSeen]] = {}
        for f, is_shared in zip(ready, flags, strict=True):
            if not is_shared:
                own.setdefault(f.session, []).append(f)
        return shared, own
