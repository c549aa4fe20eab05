"""Executing one fetch command: days → Telegram pages → day files, with resume and strategies.

``batch`` walks each run of consecutive unfinished days in one pass through the history;
``per_day`` fetches every day on its own (up to ``FETCH_CONCURRENCY`` at once), so a failed day
does not stop the others and is the unit of retry. Days already complete are skipped unless the
command says ``options.force``. Pages are journaled by the storage layer as they arrive, so a
restart resumes after the last message in the day's journal. Storage calls block (file locks,
fsync, the final merge), so they run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from loguru import logger

from fleet.chats import ChatId
from fleet.clock import Clock, SystemClock
from worker.commands import FetchCommand, day_bounds
from worker.errors import (
    FetchError,
    PermanentError,
    SessionRevoked,
    ShutdownRequested,
)
from worker.storage import DayStore, DayWriter
from worker.telegram import FetchedMessage, ResolvedChat

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

ProgressCallback = Callable[["FetchOutcome"], Awaitable[None]]


class HistorySource(Protocol):
    """What the orchestrator needs from the Telegram boundary."""

    async def resolve(self, chat: ChatId) -> ResolvedChat: ...

    def iter_history(
        self, chat: ResolvedChat, start: datetime, end: datetime, after_id: int = 0
    ) -> AsyncIterator[list[FetchedMessage]]: ...


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
    #: The chat's stored data is current up to here: the newest message written, or the end of
    #: the last complete day (``fetch_lag_seconds`` is now minus this).
    fresh_until: datetime | None = None

    def fresh_to(self, moment: datetime) -> None:
        if self.fresh_until is None or moment > self.fresh_until:
            self.fresh_until = moment

    @property
    def first_error(self) -> FetchError | None:
        return next(iter(self.days_failed.values()), None)


class _LimitReached(Exception):
    pass


class Fetcher:
    """Runs fetch commands for one Telegram session into one data root."""

    def __init__(
        self,
        telegram: HistorySource,
        store: DayStore,
        *,
        tz: ZoneInfo,
        clock: Clock | None = None,
        concurrency: int = 1,
        stop: asyncio.Event | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.telegram = telegram
        self.store = store
        self.tz = tz
        self.clock = clock or SystemClock()
        self.concurrency = max(1, concurrency)
        self.stop = stop or asyncio.Event()

    async def run(
        self, cmd: FetchCommand, on_progress: ProgressCallback | None = None
    ) -> FetchOutcome:
        """Fetch every day of ``cmd``. Errors that concern the whole command (chat missing,
        session revoked, shutdown) propagate; per-day errors are collected in the outcome."""
        outcome = FetchOutcome()
        log = logger.bind(command_id=cmd.command_id, chat=cmd.chat.display, mode=cmd.mode)
        chat = await self.telegram.resolve(cmd.chat)
        todo: list[date] = []
        for day in cmd.days:
            if not cmd.force and await asyncio.to_thread(self.store.is_complete, cmd.chat.key, day):
                self._skip(cmd, day, outcome)
            else:
                todo.append(day)
        log.debug("days to fetch: {} (skipped {} complete)", len(todo), len(outcome.days_skipped))
        budget = _Budget(cmd.limit)
        progress = _Progress(on_progress, outcome)
        try:
            if cmd.strategy == "per_day":
                await self._per_day(cmd, chat, todo, outcome, budget, progress)
            else:
                for run in _consecutive_runs(todo):
                    await self._batch(cmd, chat, run, outcome, budget, progress)
        except _LimitReached:
            log.info("limit of {} messages reached", cmd.limit)
        outcome.files.sort()
        return outcome

    # --- strategies -----------------------------------------------------------------------

    async def _per_day(
        self,
        cmd: FetchCommand,
        chat: ResolvedChat,
        days: list[date],
        outcome: FetchOutcome,
        budget: _Budget,
        progress: _Progress,
    ) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(day: date) -> None:
            async with gate:
                self._check_stop()
                try:
                    await self._batch(cmd, chat, [day], outcome, budget, progress)
                except (SessionRevoked, ShutdownRequested, PermanentError, _LimitReached):
                    raise
                except FetchError as exc:
                    outcome.errors += 1
                    outcome.days_failed[day] = exc
                    logger.bind(command_id=cmd.command_id, chat=cmd.chat.display).warning(
                        "day {} failed: {}: {}", day, exc.type_name, exc
                    )

        tasks = [asyncio.create_task(one(day)) for day in days]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _batch(
        self,
        cmd: FetchCommand,
        chat: ResolvedChat,
        days: list[date],
        outcome: FetchOutcome,
        budget: _Budget,
        progress: _Progress,
    ) -> None:
        """One pass through the history from the first to the last of consecutive ``days``."""
        if not days:
            return
        self._check_stop()
        now = self.clock.now()
        pending = list(days)
        writer = await self._open_next(cmd, pending, outcome)
        if writer is None:
            return
        try:
            start, _ = day_bounds(pending[0], self.tz)
            _, end = day_bounds(pending[-1], self.tz)
            end = min(end, now)
            pages = self.telegram.iter_history(chat, start, end, after_id=writer.resume_after_id)
            async for page in pages:
                for day, part in self._split_by_day(page):
                    while writer is not None and day > pending[0]:
                        await self._finish(cmd, writer, pending.pop(0), outcome, now)
                        writer = None
                        writer = await self._open_next(cmd, pending, outcome)
                    if writer is None:
                        break  # the remaining days were completed by an overlapping command
                    if day < pending[0]:
                        # before the interval (resume overlap); already written
                        self._deduplicated("resume_overlap", len(part))
                        continue
                    part = budget.take(part)
                    if part:
                        new = await asyncio.to_thread(writer.append_page, [m.data for m in part])
                        outcome.processed += new
                        outcome.fetched += len(part)
                        outcome.fresh_to(max(m.date for m in part))
                        if self.metrics is not None:
                            self.metrics.messages_fetched_total.inc(new)
                        self._deduplicated("storage", len(part) - new)
                    if budget.exhausted:
                        await self._finish(cmd, writer, pending[0], outcome, now, limited=True)
                        writer = None
                        await progress.report(force=True)
                        raise _LimitReached
                if writer is None:
                    aclose = getattr(pages, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    break
                await progress.report()
                self._check_stop()
            while writer is not None:
                await self._finish(cmd, writer, pending.pop(0), outcome, now)
                writer = None
                writer = await self._open_next(cmd, pending, outcome)
            await progress.report(force=True)
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.close)

    # --- helpers --------------------------------------------------------------------------

    def _deduplicated(self, source: str, count: int) -> None:
        """Messages dropped as already written (``deduplicated_messages_total{source}``)."""
        if count > 0 and self.metrics is not None:
            self.metrics.deduplicated_messages_total.labels(source=source).inc(count)

    def _skip(self, cmd: FetchCommand, day: date, outcome: FetchOutcome) -> None:
        """A day already complete: not fetched, but reported (``files``) like a written one."""
        outcome.days_skipped.append(day)
        outcome.files.append(self._relative(cmd.chat.key, day))
        outcome.fresh_to(day_bounds(day, self.tz)[1])

    async def _open_next(
        self, cmd: FetchCommand, pending: list[date], outcome: FetchOutcome
    ) -> DayWriter | None:
        """Open ``pending[0]``, skipping (and popping) days found complete on opening: an
        overlapping command on the same chat completed them after this run chose its days, or
        while this run waited for the day's lock. ``None`` when no day is left."""
        while pending:
            writer = await self._open(cmd, pending[0])
            if not writer.complete:
                return writer
            await asyncio.to_thread(writer.close)
            logger.bind(command_id=cmd.command_id, chat=cmd.chat.display).info(
                "day {} was completed by another execution meanwhile; skipped", pending[0]
            )
            self._skip(cmd, pending.pop(0), outcome)
        return None

    async def _open(self, cmd: FetchCommand, day: date) -> DayWriter:
        started = time.perf_counter()
        writer = await asyncio.to_thread(
            self.store.open_day, cmd.chat.key, cmd.chat.display, day, force=cmd.force
        )
        logger.debug(
            "day {} opened (journal read, resume after id {}) in {:.2f} ms",
            day,
            writer.resume_after_id,
            (time.perf_counter() - started) * 1000,
            event="day_opened",
            day=day.isoformat(),
        )
        return writer

    async def _finish(
        self,
        cmd: FetchCommand,
        writer: DayWriter,
        day: date,
        outcome: FetchOutcome,
        now: datetime,
        *,
        limited: bool = False,
    ) -> None:
        _, end = day_bounds(day, self.tz)
        complete = not limited and end <= now

        def finish_and_close() -> None:
            try:
                writer.finish(complete=complete)
            finally:
                writer.close()

        started = time.perf_counter()
        await asyncio.to_thread(finish_and_close)
        logger.debug(
            "day {} written ({}) in {:.2f} ms",
            day,
            "complete" if complete else "partial",
            (time.perf_counter() - started) * 1000,
            event="day_written",
            day=day.isoformat(),
        )
        outcome.files.append(self._relative(cmd.chat.key, day))
        (outcome.days_completed if complete else outcome.days_partial).append(day)
        if complete:
            outcome.fresh_to(end)

    def _split_by_day(self, page: list[FetchedMessage]) -> list[tuple[date, list[FetchedMessage]]]:
        parts: list[tuple[date, list[FetchedMessage]]] = []
        for message in page:
            day = message.date.astimezone(self.tz).date()
            if parts and parts[-1][0] == day:
                parts[-1][1].append(message)
            else:
                parts.append((day, [message]))
        return parts

    def _relative(self, chat_key: str, day: date) -> str:
        path = self.store.day_path(chat_key, day)
        return str(path.relative_to(self.store.data_dir.parent))

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise ShutdownRequested("the worker is stopping")


class _Budget:
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


class _Progress:
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


def _consecutive_runs(days: list[date]) -> list[list[date]]:
    runs: list[list[date]] = []
    for day in days:
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs
