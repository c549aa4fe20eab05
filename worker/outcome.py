"""What a fetch command did, and the two limits on how it reports and how much it writes.

:class:`FetchOutcome` is the basis of the command's events; :class:`Budget` is its ``limit``
(messages left to write); :class:`Progress` throttles the progress callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime

from worker.errors import FetchError
from worker.telegram import FetchedMessage

ProgressCallback = Callable[["FetchOutcome"], Awaitable[None]]


@dataclass
class FetchOutcome:
    """What a command did; the basis of its events."""

    processed: int = 0  # messages fetched and written (new or changed)
    fetched: int = 0  # messages received from Telegram for the interval (duplicates included)
    errors: int = 0
    files: list[str] = field(default_factory=list)  # relative to the data root
    days_completed: list[date] = field(default_factory=list)
    days_skipped: list[date] = field(default_factory=list)
    days_partial: list[date] = field(default_factory=list)  # written but not over/limited
    days_failed: dict[date, FetchError] = field(default_factory=dict)
    proof_requests: int = 0  # history requests spent proving days complete
    #: The chat's stored data is current up to here: the newest message written, or the end of
    #: the last complete day (``fetch_lag_seconds`` is now minus this).
    fresh_until: datetime | None = None
    #: The highest message id written to a day file (0: none); a command with ``after_id``
    #: advances the chat's high-water mark to it when it completes (issue 14).
    max_id: int = 0

    def fresh_to(self, moment: datetime) -> None:
        if self.fresh_until is None or moment > self.fresh_until:
            self.fresh_until = moment

    @property
    def first_error(self) -> FetchError | None:
        return next(iter(self.days_failed.values()), None)


class LimitReached(Exception):
    """The command's ``limit`` is used up: the fetch stops, and that is not an error."""


class Budget:
    """The command's ``limit``: how many more messages may be written."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self, part: list[FetchedMessage]) -> list[FetchedMessage]:
        if self.left is None:
            return part
        taken = part[: self.left]
        self.left -= len(taken)
        return taken

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0


class Progress:
    """Calls the progress callback at most once per ``interval`` seconds."""

    def __init__(
        self, callback: ProgressCallback | None, outcome: FetchOutcome, interval: float = 2.0
    ) -> None:
        self.callback = callback
        self.outcome = outcome
        self.interval = interval
        self.last = 0.0

    async def report(self, *, force: bool = False) -> None:
        if self.callback is None:
            return
        loop = asyncio.get_running_loop()
        if force or loop.time() - self.last >= self.interval:
            self.last = loop.time()
            await self.callback(self.outcome)
