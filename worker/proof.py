"""The completeness proof: a day is complete only once the server confirms where it ends.

Paging alone can stop short (a shifted window, a server ignoring ``offset_date``) and look
finished, so after a day's pages the fetcher asks for the one message just before the next
day's first message (``next_message``), or the newest before the day's end (``day_end``). If
the server names a message newer than the last one written, the day is resumed and asked
again; after ``PROOF_ATTEMPTS`` resumes the day fails as ``GapDetected`` (retryable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from loguru import logger

from worker.commands import FetchCommand, day_bounds
from worker.errors import GapDetected
from worker.outcome import Budget, FetchOutcome
from worker.storage import DayWriter
from worker.telegram import FetchedMessage, Landmark, ResolvedChat

#: How many times a day whose end the server contradicts is resumed before giving up on it.
PROOF_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Proof:
    """How a day was proven complete (recorded in its file as ``completeness``).

    ``method``: ``next_message`` (the server's message just before the first message of the
    next day is ours), ``day_end`` (the server's newest message before the day's end is ours),
    ``no_messages`` (the server has nothing before the day's end); ``server_last_id``: the id
    the server named (0 for none); ``resumed``: how many times the day had to be resumed
    because the server named a newer message than the last one written.
    """

    method: str
    server_last_id: int
    resumed: int = 0

    def header(self) -> dict[str, object]:
        return {
            "method": self.method,
            "server_last_id": self.server_last_id,
            "resumed": self.resumed,
        }


class ProofSource(Protocol):
    """What the proof asks the Telegram boundary: where a day ends, and its pages to resume."""

    def iter_history(
        self, chat: ResolvedChat, start: datetime, end: datetime, after_id: int = 0
    ) -> AsyncIterator[list[FetchedMessage]]: ...

    async def newest_before(
        self, chat: ResolvedChat, *, before: datetime | None = None, before_id: int = 0
    ) -> Landmark | None: ...


#: Appends messages to a day and counts them (the fetcher's, so counts and metrics agree).
WritePart = Callable[[DayWriter, list[FetchedMessage], FetchOutcome], Awaitable[None]]


def gap_in(mark: Landmark, start: datetime, end: datetime, last: int) -> str | None:
    """What the server's answer says is missing from the day (``None``: nothing)."""
    if mark.date < end and (mark.date < start or mark.id <= last):
        return None
    if mark.date >= end:
        return (
            f"the server answered the day's end with message {mark.id} of "
            f"{mark.date.isoformat()}, after the day (offset ignored?)"
        )
    return f"the server has message {mark.id} before the day's end but the last written is {last}"


class DayProver:
    """Proves one fetcher's days complete, resuming a day while the server contradicts it."""

    def __init__(
        self,
        source: ProofSource,
        tz: ZoneInfo,
        *,
        write: WritePart,
        check_stop: Callable[[], None],
    ) -> None:
        self.source = source
        self.tz = tz
        self.write = write
        self.check_stop = check_stop

    async def prove(
        self,
        cmd: FetchCommand,
        chat: ResolvedChat,
        writer: DayWriter,
        day: date,
        outcome: FetchOutcome,
        budget: Budget | None,
        boundary_id: int,
    ) -> Proof:
        """Ask the server where the day ends; resume while it names a message newer than the
        last one written; ``GapDetected`` (retryable) after ``PROOF_ATTEMPTS`` resumes."""
        start, end = day_bounds(day, self.tz)
        log = logger.bind(command_id=cmd.command_id, chat=cmd.chat.display)
        resumed = 0
        while True:
            last = writer.last_id
            if boundary_id:
                mark = await self.source.newest_before(chat, before_id=boundary_id)
                method = "next_message"
            else:
                mark = await self.source.newest_before(chat, before=end)
                method = "day_end"
            outcome.proof_requests += 1
            if mark is None:
                return Proof("no_messages", 0, resumed)
            gap = gap_in(mark, start, end, last)
            if gap is None:
                return Proof(method, mark.id, resumed)
            if resumed >= PROOF_ATTEMPTS:
                log.warning(
                    "day {} not proven complete: {}", day, gap, event="day_gap", day=day.isoformat()
                )
                raise GapDetected(
                    f"GAP: day {day.isoformat()} of {cmd.chat.display} left incomplete: {gap} "
                    f"(after {resumed} resumes)",
                    rpc_error="GAP",
                )
            resumed += 1
            log.info(
                "day {}: {}; resuming after {}",
                day,
                gap,
                last,
                event="day_resumed",
                day=day.isoformat(),
            )
            await self._resume(chat, writer, (start, end), outcome, budget)
            if budget is not None and budget.exhausted:
                return Proof(method, mark.id, resumed)
            boundary_id = 0  # the resumed pages ended the day on their own: ask by date

    async def _resume(
        self,
        chat: ResolvedChat,
        writer: DayWriter,
        bounds: tuple[datetime, datetime],
        outcome: FetchOutcome,
        budget: Budget | None,
    ) -> None:
        """Page through the day again after its last written message."""
        start, end = bounds
        pages = self.source.iter_history(chat, start, end, after_id=writer.last_id)
        async for page in pages:
            part = budget.take(page) if budget is not None else page
            if part:
                await self.write(writer, part, outcome)
            if budget is not None and budget.exhausted:
                return
            self.check_stop()
