"""Executing one fetch command: days → Telegram pages → day files, with resume and strategies.

``batch`` walks each run of consecutive unfinished days in one pass through the history;
``per_day`` fetches every day on its own (up to ``FETCH_CONCURRENCY`` at once), so a failed day
does not stop the others and is the unit of retry. Days already complete are skipped unless the
command says ``options.force``. Pages are journaled by the storage layer as they arrive, so a
restart resumes after the last message in the day's journal. Storage calls block (file locks,
fsync, the final merge), so they run in a thread, never on the event loop. A day is complete
only once the server confirms its end (:mod:`worker.proof`), and never under another chat's
name (:mod:`worker.rightchat`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from loguru import logger

from fleet.chats import ChatId
from fleet.clock import Clock, SystemClock
from worker.commands import FetchCommand, day_bounds
from worker.daywriter import DayWriter
from worker.errors import (
    ChatMoved,
    FetchError,
    PermanentError,
    SessionRevoked,
    ShutdownRequested,
)
from worker.outcome import Budget, FetchOutcome, LimitReached, Progress, ProgressCallback
from worker.proof import DayProver, Proof, ProofSource
from worker.rightchat import check_same_chat
from worker.storage import DayStore
from worker.telegram import FetchedMessage, ResolvedChat

__all__ = ["FetchOutcome", "Fetcher", "HistorySource", "ProgressCallback"]

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics


class HistorySource(ProofSource, Protocol):
    """What the orchestrator needs from the Telegram boundary: the proof's pages and
    landmarks, and resolving the command's chat."""

    async def resolve(self, chat: ChatId) -> ResolvedChat: ...


@dataclass
class _Pass:
    """One pass through the history over consecutive days: what ``_batch``'s helpers share.

    ``writer`` is the open day (``pending[0]``); it is set to ``None`` only once that day is
    finished, so that whatever fails before leaves it to be closed by ``_batch``."""

    cmd: FetchCommand
    chat: ResolvedChat
    pending: list[date]
    outcome: FetchOutcome
    now: datetime
    budget: Budget
    progress: Progress
    writer: DayWriter | None = None


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
        self._prover = DayProver(telegram, tz, write=self._write, check_stop=self._check_stop)

    async def run(
        self, cmd: FetchCommand, on_progress: ProgressCallback | None = None
    ) -> FetchOutcome:
        """Fetch every day of ``cmd``. Errors that concern the whole command (chat missing,
        session revoked, shutdown) propagate; per-day errors are collected in the outcome."""
        outcome = FetchOutcome()
        log = logger.bind(command_id=cmd.command_id, chat=cmd.chat.display, mode=cmd.mode)
        chat = await self.telegram.resolve(cmd.chat)
        await check_same_chat(self.store, cmd, chat)
        todo: list[date] = []
        for day in cmd.days:
            if not cmd.force and await asyncio.to_thread(self.store.is_complete, cmd.chat.key, day):
                await asyncio.to_thread(
                    self.store.sweep_journal, cmd.chat.key, cmd.chat.display, day
                )
                self._skip(cmd, day, outcome)
            else:
                todo.append(day)
        log.debug("days to fetch: {} (skipped {} complete)", len(todo), len(outcome.days_skipped))
        budget = Budget(cmd.limit)
        progress = Progress(on_progress, outcome)
        try:
            if cmd.strategy == "per_day":
                await self._per_day(cmd, chat, todo, outcome, budget, progress)
            else:
                for run in _consecutive_runs(todo):
                    await self._batch(cmd, chat, run, outcome, budget, progress)
        except LimitReached:
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
        budget: Budget,
        progress: Progress,
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
                    LimitReached,
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
        budget: Budget,
        progress: Progress,
    ) -> None:
        """One pass through the history from the first to the last of consecutive ``days``."""
        if not days:
            return
        self._check_stop()
        run = _Pass(cmd, chat, list(days), outcome, self.clock.now(), budget, progress)
        run.writer = await self._open_next(cmd, run.pending, outcome)
        if run.writer is None:
            return
        try:
            start, _ = day_bounds(run.pending[0], self.tz)
            _, end = day_bounds(run.pending[-1], self.tz)
            end = min(end, run.now)
            # An incremental command (after_id) asks only for what is above the chat's mark.
            after = max(run.writer.resume_after_id, cmd.after_id or 0)
            pages = self.telegram.iter_history(chat, start, end, after_id=after)
            async for page in pages:
                await self._take_page(run, page)
                if run.writer is None:
                    aclose = getattr(pages, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    break
                await progress.report()
                self._check_stop()
            while run.writer is not None:
                await self._finish_first(run)
            await progress.report(force=True)
        finally:
            if run.writer is not None:
                await asyncio.to_thread(run.writer.close)

    async def _take_page(self, run: _Pass, page: list[FetchedMessage]) -> None:
        """Write one page into its days, finishing each day the page has gone past."""
        for day, part in self._split_by_day(page):
            while run.writer is not None and day > run.pending[0]:
                # part[0] is the first message after the day: the proof starts there.
                await self._finish_first(run, boundary_id=part[0].id)
            if run.writer is None:
                return  # the remaining days were completed by an overlapping command
            if day < run.pending[0]:
                # before the interval (resume overlap); already written
                self._deduplicated("resume_overlap", len(part))
                continue
            part = run.budget.take(part)
            if part:
                await self._write(run.writer, part, run.outcome)
                run.outcome.max_id = max(run.outcome.max_id, max(m.id for m in part))
            if run.budget.exhausted:
                await self._finish(
                    run.cmd,
                    run.writer,
                    run.pending[0],
                    run.outcome,
                    run.now,
                    chat=run.chat,
                    limited=True,
                )
                run.writer = None
                await run.progress.report(force=True)
                raise LimitReached

    async def _finish_first(self, run: _Pass, *, boundary_id: int = 0) -> None:
        """Finish the open day (``pending[0]``) and open the next one left to fetch."""
        assert run.writer is not None
        await self._finish(
            run.cmd,
            run.writer,
            run.pending.pop(0),
            run.outcome,
            run.now,
            chat=run.chat,
            budget=run.budget,
            boundary_id=boundary_id,
        )
        run.writer = None
        run.writer = await self._open_next(run.cmd, run.pending, run.outcome)

    async def _write(
        self, writer: DayWriter, part: list[FetchedMessage], outcome: FetchOutcome
    ) -> None:
        """Append messages to the day's journal and count them (new, and dropped as known)."""
        new = await asyncio.to_thread(writer.append_page, [m.data for m in part])
        outcome.processed += new
        outcome.fetched += len(part)
        outcome.fresh_to(max(m.date for m in part))
        if self.metrics is not None:
            self.metrics.messages_fetched_total.inc(new)
        self._deduplicated("storage", len(part) - new)

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
        chat: ResolvedChat,
        limited: bool = False,
        budget: Budget | None = None,
        boundary_id: int = 0,
    ) -> None:
        _, end = day_bounds(day, self.tz)
        complete = not limited and end <= now
        proof: Proof | None = None
        if complete:
            # A day is complete only once the server confirms its end: paging alone can stop
            # short (a shifted window, a server ignoring offset_date) and look finished.
            proof = await self._prover.prove(cmd, chat, writer, day, outcome, budget, boundary_id)
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


def _consecutive_runs(days: list[date]) -> list[list[date]]:
    runs: list[list[date]] = []
    for day in days:
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs
