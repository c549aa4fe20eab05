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
from worker.dayfile import read_final_header
from worker.daywriter import DayWriter
from worker.errors import (
    ChatMoved,
    FetchError,
    GapDetected,
    PermanentError,
    SessionRevoked,
    ShutdownRequested,
)
from worker.storage import DayStore
from worker.telegram import FetchedMessage, Landmark, ResolvedChat

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

ProgressCallback = Callable[["FetchOutcome"], Awaitable[None]]


class HistorySource(Protocol):
    """What the orchestrator needs from the Telegram boundary."""

    async def resolve(self, chat: ChatId) -> ResolvedChat: ...

    def iter_history(
        self, chat: ResolvedChat, start: datetime, end: datetime, after_id: int = 0
    ) -> AsyncIterator[list[FetchedMessage]]: ...

    async def newest_before(
        self, chat: ResolvedChat, *, before: datetime | None = None, before_id: int = 0
    ) -> Landmark | None: ...


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
        await self._check_same_chat(cmd, chat)
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
                except (
                    SessionRevoked,
                    ShutdownRequested,
                    PermanentError,
                    ChatMoved,
                    _LimitReached,
                ):
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
            # An incremental command (after_id) asks only for what is above the chat's mark.
            after = max(writer.resume_after_id, cmd.after_id or 0)
            pages = self.telegram.iter_history(chat, start, end, after_id=after)
            async for page in pages:
                for day, part in self._split_by_day(page):
                    while writer is not None and day > pending[0]:
                        # part[0] is the first message after the day: the proof starts there.
                        await self._finish(
                            cmd,
                            writer,
                            pending.pop(0),
                            outcome,
                            now,
                            chat=chat,
                            budget=budget,
                            boundary_id=part[0].id,
                        )
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
                        outcome.max_id = max(outcome.max_id, max(m.id for m in part))
                        if self.metrics is not None:
                            self.metrics.messages_fetched_total.inc(new)
                        self._deduplicated("storage", len(part) - new)
                    if budget.exhausted:
                        await self._finish(
                            cmd, writer, pending[0], outcome, now, chat=chat, limited=True
                        )
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
                await self._finish(
                    cmd, writer, pending.pop(0), outcome, now, chat=chat, budget=budget
                )
                writer = None
                writer = await self._open_next(cmd, pending, outcome)
            await progress.report(force=True)
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.close)

    # --- helpers --------------------------------------------------------------------------

    async def _check_same_chat(self, cmd: FetchCommand, chat: ResolvedChat) -> None:
        """Refuse to write a chat into a directory that holds another chat's days (the name
        moved to another chat since they were written): two chats must never be merged."""
        recorded = await asyncio.to_thread(self._recorded_chat_id, cmd.chat.key)
        if recorded is None or recorded == chat.peer_id:
            return
        raise PermanentError(
            f"CHAT_ID_CHANGED: {cmd.chat.display} is chat {chat.peer_id} now, but "
            f"{self.store.data_dir / cmd.chat.key} holds chat {recorded}'s days (the name "
            "moved to another chat); refusing to merge two chats: move that directory away, "
            "or fetch the old chat by its id",
            rpc_error="CHAT_ID_CHANGED",
        )

    def _recorded_chat_id(self, chat_key: str) -> int | None:
        """The ``chat_id`` of the newest day file of the chat's directory that records one
        (files written before ids were recorded have none); a few files at most are read."""
        root = self.store.data_dir / chat_key
        try:
            years = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)
        except FileNotFoundError:
            return None
        looked = 0
        for year in years:
            for path in sorted(year.glob("discussions_*.json"), reverse=True):
                try:
                    header = read_final_header(path)
                except OSError:
                    continue
                chat_id = (header or {}).get("chat_id")
                if isinstance(chat_id, int):
                    return chat_id
                looked += 1
                if looked >= 3:
                    return None
        return None

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
        chat: ResolvedChat,
        limited: bool = False,
        budget: _Budget | None = None,
        boundary_id: int = 0,
    ) -> None:
        _, end = day_bounds(day, self.tz)
        complete = not limited and end <= now
        proof: Proof | None = None
        if complete:
            # A day is complete only once the server confirms its end: paging alone can stop
            # short (a shifted window, a server ignoring offset_date) and look finished.
            proof = await self._prove(cmd, chat, writer, day, outcome, budget, boundary_id)
            if budget is not None and budget.exhausted:
                complete, limited = False, True
        header: dict[str, object] = {"chat_id": chat.peer_id}
        if proof is not None and complete:
            header["completeness"] = proof.header()

        def finish_and_close() -> None:
            try:
                writer.finish(complete=complete, header=header)
            finally:
                writer.close()

        started = time.perf_counter()
        await asyncio.to_thread(finish_and_close)
        logger.debug(
            "day {} written ({}) in {:.2f} ms",
            day,
            f"complete, {proof.method}" if complete and proof else "partial",
            (time.perf_counter() - started) * 1000,
            event="day_written",
            day=day.isoformat(),
        )
        outcome.files.append(self._relative(cmd.chat.key, day))
        (outcome.days_completed if complete else outcome.days_partial).append(day)
        if complete:
            outcome.fresh_to(end)

    async def _prove(
        self,
        cmd: FetchCommand,
        chat: ResolvedChat,
        writer: DayWriter,
        day: date,
        outcome: FetchOutcome,
        budget: _Budget | None,
        boundary_id: int,
    ) -> Proof:
        """Ask the server where the day ends; resume while it names a message newer than the
        last one written; ``GapDetected`` (retryable) after ``PROOF_ATTEMPTS`` resumes."""
        start, end = day_bounds(day, self.tz)
        resumed = 0
        while True:
            last = writer.last_id
            if boundary_id:
                mark = await self.telegram.newest_before(chat, before_id=boundary_id)
                method = "next_message"
            else:
                mark = await self.telegram.newest_before(chat, before=end)
                method = "day_end"
            outcome.proof_requests += 1
            if mark is None:
                return Proof("no_messages", 0, resumed)
            if mark.date < end and (mark.date < start or mark.id <= last):
                return Proof(method, mark.id, resumed)
            if mark.date >= end:
                gap = (
                    f"the server answered the day's end with message {mark.id} of "
                    f"{mark.date.isoformat()}, after the day (offset ignored?)"
                )
            else:
                gap = (
                    f"the server has message {mark.id} before the day's end but the last "
                    f"written is {last}"
                )
            if resumed >= PROOF_ATTEMPTS:
                logger.bind(command_id=cmd.command_id, chat=cmd.chat.display).warning(
                    "day {} not proven complete: {}", day, gap, event="day_gap", day=day.isoformat()
                )
                raise GapDetected(
                    f"GAP: day {day.isoformat()} of {cmd.chat.display} left incomplete: {gap} "
                    f"(after {resumed} resumes)",
                    rpc_error="GAP",
                )
            resumed += 1
            logger.bind(command_id=cmd.command_id, chat=cmd.chat.display).info(
                "day {}: {}; resuming after {}",
                day,
                gap,
                last,
                event="day_resumed",
                day=day.isoformat(),
            )
            await self._resume_day(chat, writer, start, end, outcome, budget)
            if budget is not None and budget.exhausted:
                return Proof(method, mark.id, resumed)
            boundary_id = 0  # the resumed pages ended the day on their own: ask by date

    async def _resume_day(
        self,
        chat: ResolvedChat,
        writer: DayWriter,
        start: datetime,
        end: datetime,
        outcome: FetchOutcome,
        budget: _Budget | None,
    ) -> None:
        pages = self.telegram.iter_history(chat, start, end, after_id=writer.last_id)
        async for page in pages:
            part = budget.take(page) if budget is not None else page
            if part:
                new = await asyncio.to_thread(writer.append_page, [m.data for m in part])
                outcome.processed += new
                outcome.fetched += len(part)
                outcome.fresh_to(max(m.date for m in part))
                if self.metrics is not None:
                    self.metrics.messages_fetched_total.inc(new)
                self._deduplicated("storage", len(part) - new)
            if budget is not None and budget.exhausted:
                return
            self._check_stop()

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
