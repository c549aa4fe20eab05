"""All time a fleet process reads goes through a :class:`Clock`, so tests can move time instead of
sleeping. ``SystemClock`` is the real one; ``FakeClock`` advances only when slept on."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale, for durations."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when slept on (or :meth:`advance` is called); records sleeps."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2025, 11, 9, 12, 0, tzinfo=UTC)
        self._offset = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        from datetime import timedelta

        return self._start + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        return self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._offset += max(0.0, seconds)
        await asyncio.sleep(0)


def utc_iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` and whole seconds, as every artifact writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
