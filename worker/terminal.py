"""The end of one execution: its terminal step, its event, its metrics and its last log line.

A terminal step is one Lua script (ack, retry later, or dead letter, with the terminal event
written in the same script) that does nothing, and publishes nothing, unless the command is still
in our processing list and our lease is ours (:meth:`TerminalSteps._terminal`). The outcomes:

- ``completed`` (``status`` ok / partial) and the ack, advancing the chat's mark for ``after_id``;
- ``failed`` with ``retryable: true`` and a delayed retry, up to ``COMMAND_RETRY_MAX``;
- ``failed`` not retryable: ``PermanentError``, retries exhausted, or a rejected command
  (dead letter, ``source: validation``); a storage error (dead letter, ``source: storage``,
  for a requeue once the storage is repaired); an internal error (dead letter,
  ``source: internal``).

:class:`TerminalSteps` is the base of :class:`worker.executor.CommandExecutor`; the per-day
parts of a split command (:mod:`worker.parts`) use its ownership check and its metrics too.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from fleet.clock import Clock, SystemClock, utc_iso
from fleet.deadletters import new_dead_letter
from fleet.events import EventPublisher, make_event
from fleet.redisconn import RedisLink
from worker.errors import BreakerOpen, FetchError, RateLimited, StorageError
from worker.metrics import WorkerMetrics
from worker.queue import WorkQueue
from worker.running import Running, Tally
from worker.settings import WorkerSettings

#: Builds one event of the execution (kind, outcome, extra fields): see CommandExecutor.
EventFactory = Callable[..., dict[str, Any]]


class TerminalSteps:
    """The terminal steps of the executions of one worker."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        worker_id: str,
        queue: WorkQueue,
        publisher: EventPublisher,
        link: RedisLink,
        metrics: WorkerMetrics,
        tally: Tally,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.worker_id = worker_id
        self.queue = queue
        self.publisher = publisher
        self.link = link
        self.metrics = metrics
        self.tally = tally

    async def _reject(
        self, raw: bytes, reason: str, command_id: str | None, chat: str | None
    ) -> None:
        """An invalid command: ``failed`` (not retryable) and a dead letter keeping its bytes."""
        letter = new_dead_letter(
            raw,
            reason=reason,
            error_type="CommandRejected",
            command_id=command_id,
            chat=chat,
            worker_id=self.worker_id,
            source="validation",
        )
        self.metrics.commands_total.labels(status="rejected").inc()
        logger.bind(worker_id=self.worker_id, command_id=command_id, chat=chat).warning(
            "rejected command ({} bytes): {}; dead letter {}",
            len(raw),
            reason,
            letter.id,
            event="command_rejected",
            error_type="CommandRejected",
        )
        event = make_event(
            "failed",
            command_id=command_id,
            chat=chat,
            mode=None,
            params={},
            worker_id=self.worker_id,
            error_type="CommandRejected",
            error_message=f"{reason} (dead letter {letter.id})",
            retryable=False,
        )
        await self.link.call(
            lambda: self.queue.dead_letter(raw, letter, event=event), "dead letter"
        )

    async def _complete(
        self, running: Running, event: EventFactory, outcome: Any, log: Any
    ) -> None:
        """``completed`` and the ack, in one step."""
        cmd = running.cmd
        if not await self._still_ours(running, log):
            return
        status = "partial" if outcome.days_partial else "ok"
        done = event("completed", outcome, status=status, files=outcome.files)
        # issue 14: a command with after_id advances the chat's mark in the ack itself, after
        # its day files and progress are written. With a limit, messages above the last one
        # written may be missing, so no mark is claimed.
        mark = (
            (cmd.chat.key, max(cmd.after_id, outcome.max_id), cmd.days[-1].isoformat())
            if cmd.after_id is not None and cmd.limit is None
            else None
        )
        if not await self._terminal(
            running,
            log,
            lambda: self.queue.ack(
                running.entry, cmd.command_id, completed=True, event=done, mark=mark
            ),
        ):
            return
        self.tally.served += 1
        self._finished(running, status, None, outcome)
        self.tally.last_success = (
            self.tally.last_command["finished"] if self.tally.last_command else None
        )
        log.bind(**self._summary(running, outcome)).info(
            "command completed: {} messages, {} files, days complete {}, skipped {}, partial {}",
            outcome.processed,
            len(outcome.files),
            len(outcome.days_completed),
            len(outcome.days_skipped),
            len(outcome.days_partial),
            event="command_completed",
        )

    def _summary(self, running: Running, outcome: Any) -> dict[str, Any]:
        """The counts every command's last log line carries."""
        cmd = running.cmd
        done = (
            len(outcome.days_completed) + len(outcome.days_skipped) + len(outcome.days_partial)
            if outcome is not None
            else 0
        )
        return {
            "duration_ms": int((self.clock.monotonic() - running.started) * 1000),
            "message_count": outcome.fetched if outcome is not None else 0,
            "processed": outcome.processed if outcome is not None else 0,
            "days_done": done,
            "total": len(cmd.days),
        }

    def _finished(
        self, running: Running, status: str, error_type: str | None, outcome: Any
    ) -> None:
        """Metrics of one finished execution, and what ``/health/details`` shows of it."""
        m = self.metrics
        cmd = running.cmd
        m.commands_total.labels(status=status).inc()
        m.observe_fetch(cmd.chat.display, self.clock.monotonic() - running.started)
        if error_type is not None:
            m.fetch_errors_total.labels(type=error_type).inc()
        if outcome is not None and outcome.fresh_until is not None:
            label = m.chat_label(cmd.chat.display)
            fresh = outcome.fresh_until.timestamp()
            # Per chat the freshest data counts (a backfill of old days does not make the chat
            # look stale); in the shared "other" bucket the last write wins.
            if label != "other":
                fresh = max(fresh, self.tally.fresh_until.get(label, fresh))
            self.tally.fresh_until[label] = fresh
            now = self.clock.now().timestamp()
            m.fetch_lag_seconds.labels(chat=label).set(max(0.0, now - fresh))
        self.tally.last_command = {
            "command_id": cmd.command_id,
            "chat": cmd.chat.display,
            "status": status,
            "finished": utc_iso(self.clock.now()),
        }

    async def _still_ours(self, running: Running, log: Any) -> bool:
        """Is the command still in our processing list? (Not if our lease expired during an
        outage and a recovery gave it to another worker: then that execution reports.)"""
        if running.taken_over:
            return False
        held = await self.link.call(lambda: self.queue.holds(running.entry), "ownership")
        if not held:
            running.taken_over = True
            log.warning("command was recovered by another worker while we ran it; no event")
        return held

    async def _terminal(self, running: Running, log: Any, step: Callable[[], Any]) -> bool:
        """The terminal step (ack / retry later / dead letter with its event) as one script that
        does nothing, and publishes nothing, unless the command is still in our processing list
        and our lease is ours: the check and the step cannot be separated by a pause of this
        process (SIGSTOP, a long GC, a swapped-out VM) during which another worker took over."""
        await _test_pause(running.cmd.command_id)
        result = await self.link.call(step, "terminal step")
        ours = result is True or (not isinstance(result, bool) and int(result) >= 0)
        if not ours:
            running.taken_over = True
            log.warning("command was recovered by another worker while we ran it; no event")
        else:
            self.publisher.published += 1
        return ours

    async def _retry_or_fail(
        self, running: Running, event: EventFactory, exc: FetchError, outcome: Any
    ) -> None:
        s = self.settings
        cmd = running.cmd
        log = logger.bind(
            worker_id=self.worker_id, command_id=cmd.command_id, chat=cmd.chat.display
        )
        if not await self._still_ours(running, log):
            return
        done = await self.link.call(lambda: self.queue.retries(cmd.command_id), "retry count")
        if not exc.retryable or done >= s.command_retry_max:
            why = "" if not exc.retryable else f" (gave up after {done} retries)"
            if isinstance(exc, StorageError):
                # Not the command's fault: keep it in the dead letters for a requeue once the
                # storage is repaired (`python -m worker dead-letters --requeue ID`).
                await self._storage_dead_letter(running, event, exc, why, outcome)
                return
            await self._finish_failed(
                running, event, exc, retryable=False, suffix=why, outcome=outcome
            )
            return
        delay = self._retry_delay(exc, done)
        message = f"{exc} (retry {done + 1}/{s.command_retry_max} in {delay:.0f}s)"
        failed = event(
            "failed",
            outcome,
            error_type=exc.type_name,
            error_message=message,
            retryable=True,
        )
        if not await self._terminal(
            running,
            log,
            lambda: self.queue.retry_later(running.entry, cmd.command_id, delay, event=failed),
        ):
            return
        self._finished(running, "retrying", exc.type_name, outcome)
        log.bind(error_type=exc.type_name, **self._summary(running, outcome)).warning(
            "command failed, will retry: {}",
            message,
            event="command_failed",
            retryable=True,
            wait_seconds=round(delay, 3),
        )

    def _retry_delay(self, exc: FetchError, done: int) -> float:
        """Telegram's own wait for a rate limit or an open breaker; else exponential backoff."""
        s = self.settings
        if isinstance(exc, RateLimited | BreakerOpen):
            delay = max(exc.retry_after, s.command_retry_base_seconds)
        else:
            delay = min(s.command_retry_max_seconds, s.command_retry_base_seconds * 2**done)
        return delay * random.uniform(1.0, 1.1)  # workers failing together do not retry together

    async def _storage_dead_letter(
        self,
        running: Running,
        event: EventFactory,
        exc: StorageError,
        why: str,
        outcome: Any,
    ) -> None:
        cmd = running.cmd
        log = logger.bind(
            worker_id=self.worker_id, command_id=cmd.command_id, chat=cmd.chat.display
        )
        letter = new_dead_letter(
            running.entry,
            reason=f"storage error: {exc}{why}",
            error_type=exc.type_name,
            command_id=cmd.command_id,
            chat=cmd.chat.display,
            worker_id=self.worker_id,
            source="storage",
        )
        failed = event(
            "failed",
            outcome,
            error_type=exc.type_name,
            error_message=f"{exc}{why} (dead letter {letter.id})",
            retryable=False,
        )
        if not await self._terminal(
            running, log, lambda: self.queue.dead_letter(running.entry, letter, event=failed)
        ):
            return
        self._finished(running, "failed", exc.type_name, outcome)
        log.bind(error_type=exc.type_name, **self._summary(running, outcome)).error(
            "command failed on storage{}; dead letter {}",
            why,
            letter.id,
            event="command_failed",
            retryable=False,
        )

    async def _finish_failed(
        self,
        running: Running,
        event: EventFactory,
        exc: FetchError,
        *,
        retryable: bool,
        suffix: str = "",
        outcome: Any = None,
    ) -> None:
        cmd = running.cmd
        log = logger.bind(
            worker_id=self.worker_id, command_id=cmd.command_id, chat=cmd.chat.display
        )
        if not await self._still_ours(running, log):
            return
        failed = event(
            "failed",
            outcome,
            error_type=exc.type_name,
            error_message=f"{exc}{suffix}",
            retryable=retryable,
        )
        if not await self._terminal(
            running,
            log,
            lambda: self.queue.ack(running.entry, cmd.command_id, completed=False, event=failed),
        ):
            return
        self._finished(running, "failed", exc.type_name, outcome)
        log.bind(error_type=exc.type_name, **self._summary(running, outcome)).error(
            "command failed: {}{}", exc, suffix, event="command_failed", retryable=False
        )

    async def _internal_error(
        self, running: Running, event: EventFactory, exc: Exception, log: Any
    ) -> None:
        """Dead letter + ``failed``, on the same ownership terms as every terminal step."""
        cmd = running.cmd
        if not await self._still_ours(running, log):
            return
        letter = new_dead_letter(
            running.entry,
            reason=f"internal error: {type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
            command_id=cmd.command_id,
            chat=cmd.chat.display,
            worker_id=self.worker_id,
            source="internal",
        )
        failed = event(
            "failed",
            error_type=type(exc).__name__,
            error_message=f"internal error: {exc} (dead letter {letter.id})",
            retryable=False,
        )
        if not await self._terminal(
            running, log, lambda: self.queue.dead_letter(running.entry, letter, event=failed)
        ):
            return
        self._finished(running, "error", type(exc).__name__, None)
        log.opt(exception=exc).error(
            "internal error in command; dead-lettered",
            event="command_failed",
            error_type=type(exc).__name__,
            duration_ms=int((self.clock.monotonic() - running.started) * 1000),
        )


async def _test_pause(command_id: str) -> None:
    """Fault-test hook, inert unless the test harness sets ``WORKER_TEST_PAUSE_FILE``: before
    the first terminal step of this process, write the command id to that file and wait until
    the test removes it (the test then SIGSTOPs us past our lease and lets another worker take
    the command over, reproducing a pause in the window between ownership check and ack)."""
    path = os.environ.get("WORKER_TEST_PAUSE_FILE")
    if not path or _paused:
        return
    _paused.append(command_id)
    marker = Path(path)
    await asyncio.to_thread(marker.write_text, command_id, "utf-8")
    # Another process (the test) removes the file: nothing in this process could set an Event.
    while await asyncio.to_thread(marker.exists):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


_paused: list[str] = []  # the hook pauses once per process


__all__ = ["EventFactory", "TerminalSteps"]
