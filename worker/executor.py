"""One execution of a command taken from ``tg_commands``: :class:`CommandExecutor`.

Validate (``MAX_COMMAND_BYTES`` first, never parsed above it) → skip if its id completed already
→ ``started`` → fetch (throttled ``progress``) → one terminal event → ack. Invalid commands:
``failed`` (not retryable) + dead letter. Retryable failures (rate limit above the cap, transient
errors, breaker open, failed days of ``per_day``): ``failed`` with ``retryable: true`` and a
delayed retry, up to ``COMMAND_RETRY_MAX``; then ``failed`` not retryable. ``PermanentError``:
``failed``, not retryable. ``SessionRevoked``: the command goes back to the queue (no event) and
the daemon is told to stop (it marks the session bad and exits 77).

A command whose id already completed (within ``COMPLETED_IDS_TTL_SECONDS``) is acknowledged and
skipped with a log line and **no event**: it is not executed, and CONTRACT §4 asks for exactly
one terminal event per execution. A command redelivered after its worker died *is* executed
again (days already complete are skipped by the fetcher) and gets its own events.

The lifecycle around it (taking, leases, heartbeat, shutdown) is :mod:`worker.daemon`'s; the
two share the map of running commands, the task → entry map and the :class:`Tally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from fleet.clock import Clock, SystemClock, utc_iso
from fleet.deadletters import new_dead_letter
from fleet.events import EventPublisher, ProgressThrottle, make_event
from fleet.redisconn import REDIS_DOWN, RedisLink
from worker import parts
from worker.commands import CommandLimits, FetchCommand, parse_command, salvage_identity, today_in
from worker.errors import (
    BreakerOpen,
    CommandRejected,
    FetchError,
    PermanentError,
    RateLimited,
    SessionRevoked,
    ShutdownRequested,
    StorageError,
)
from worker.metrics import WorkerMetrics
from worker.queue import WorkQueue
from worker.settings import WorkerSettings


@dataclass
class Running:
    """One command being executed by this worker."""

    entry: bytes  # as it is in the processing list
    cmd: FetchCommand
    started: float  # the executor's clock, monotonic
    started_at: str  # UTC, ISO 8601
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    taken_over: bool = False  # the lease expired and another worker may run it


@dataclass
class Tally:
    """What this worker's executions did so far, for the health file, ``/health/details``, the
    lag metric and the shutdown summary. Plain attributes: the HTTP server's thread reads them."""

    served: int = 0
    last_success: str | None = None
    last_command: dict[str, Any] | None = None
    # chat label -> unix time its data is current to
    fresh_until: dict[str, float] = field(default_factory=dict)


class CommandExecutor:
    """Executes the commands the daemon takes, one :meth:`execute` task per command."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        worker_id: str,
        queue: WorkQueue,
        publisher: EventPublisher,
        link: RedisLink,
        telegram: Any,
        store: Any,
        metrics: WorkerMetrics,
        tally: Tally,
        running: dict[str, Running],
        held: dict[asyncio.Task[None], bytes],
        stop: asyncio.Event,
        slot_freed: asyncio.Event,
        on_busy: Callable[[], None],
        on_revoked: Callable[[SessionRevoked], None],
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.worker_id = worker_id
        self.queue = queue
        self.publisher = publisher
        self.link = link
        self.telegram = telegram
        self.store = store
        self.metrics = metrics
        self.tally = tally
        self.running = running  # by command_id
        self.held = held  # task -> its processing-list entry
        self.stop = stop  # the daemon's: stop taking
        self._slot_freed = slot_freed
        self._on_busy = on_busy
        self._on_revoked = on_revoked
        self._chat_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.waiting = 0  # tasks waiting for their chat's lock
        # Executions in a row that failed on this worker's storage (disk full, read-only...):
        # the daemon stops taking commands at STORAGE_FAILURES_PAUSE and probes the storage.
        self.storage_failures = 0

    async def execute(self, raw: bytes) -> None:
        """One command taken from the queue, from its raw bytes to its ack (or hand-back)."""
        s = self.settings
        logger.debug("command received ({} bytes)", len(raw), event="command_received")
        if len(raw) > s.max_command_bytes:
            await self._reject(
                raw,
                f"command is {len(raw)} bytes, more than MAX_COMMAND_BYTES={s.max_command_bytes}",
                None,
                None,
            )
            return
        limits = CommandLimits(
            today=today_in(s.tz, self.clock.now()),
            max_range_days=s.max_range_days,
            max_command_bytes=s.max_command_bytes,
            default_strategy=s.fetch_strategy,
        )
        try:
            cmd = parse_command(raw, limits)
        except CommandRejected as exc:
            cid, chat = salvage_identity(raw)
            await self._reject(raw, str(exc), cid, chat)
            return
        # Everything the command does from here on, in this task and in the tasks and threads
        # it starts (per-day fetches, storage, progress events), logs these three fields.
        with logger.contextualize(command_id=cmd.command_id, chat=cmd.chat.display, mode=cmd.mode):
            logger.debug(
                "command parsed: {} {}, strategy {}, {} days, limit {}",
                cmd.mode,
                cmd.params,
                cmd.strategy,
                len(cmd.days),
                cmd.limit,
                event="command_parsed",
            )
            await self._execute_parsed(raw, cmd)

    async def _execute_parsed(self, raw: bytes, cmd: FetchCommand) -> None:
        s = self.settings
        log = logger.bind(worker_id=self.worker_id)
        entry = raw
        if salvage_identity(raw)[0] != cmd.command_id:
            new = cmd.to_json().encode("utf-8")
            if not await self.link.call(lambda: self.queue.replace(raw, new), "assign id"):
                return  # taken away from us meanwhile (lease expired): not ours to run
            entry = new
            task = asyncio.current_task()
            if task is not None:
                self.held[task] = entry
        log = log.bind(command_id=cmd.command_id, chat=cmd.chat.display)
        # issue 14: parts of one split command (different days) need not wait for each other;
        # waiting would free the slot and let this worker hoard parts other workers could run.
        lock = self._chat_locks[parts.lock_key(entry, cmd)]
        if lock.locked():
            log.info("chat {} is busy in this worker; the command waits", cmd.chat.display)
            # A command waiting here does not run: if the worker dies meanwhile, the command
            # is not what killed it, so its delivery count starts again from this death.
            with contextlib.suppress(*REDIS_DOWN):
                await self.queue.made_progress(cmd.command_id)
            self.waiting += 1
            self._slot_freed.set()
            try:
                await lock.acquire()
            finally:
                self.waiting -= 1
        else:
            await lock.acquire()
        try:
            if self.stop.is_set():
                return  # still in the processing list: handed back at shutdown
            done_at = await self.link.call(
                lambda: self.queue.completed_at(cmd.command_id), "completed ids"
            )
            if done_at is not None:
                await self.link.call(lambda: self.queue.ack(entry, cmd.command_id, completed=False))
                log.info(
                    "command already completed at {}; skipped (no event: not executed)",
                    utc_iso(datetime.fromtimestamp(done_at, UTC)),
                )
                return
            owner = await self.link.call(lambda: self.queue.claim_run(cmd.command_id), "claim run")
            if owner is not None:
                # The same command_id is being executed by a live worker: run it at most once.
                # Come back later; by then it completed (skipped) or that worker died (ours).
                delay = max(1.0, s.worker_lease_seconds)
                deferred = await self.link.call(
                    lambda: self.queue.retry_later(entry, cmd.command_id, delay, count=False),
                    "defer",
                )
                if deferred < 0:
                    return  # recovered away from us meanwhile: not ours to defer
                log.info("same command running on {}; this copy deferred {:g}s", owner, delay)
                return
            running = Running(
                entry=entry,
                cmd=cmd,
                started=self.clock.monotonic(),
                started_at=utc_iso(self.clock.now()),
            )
            if self.stop.is_set():
                running.stop.set()
            self.running[cmd.command_id] = running
            try:
                # issue 14: per_day commands may be split into parts for the fleet (or be one)
                await parts.execute(self, running, log)
            finally:
                self.running.pop(cmd.command_id, None)
        finally:
            lock.release()

    async def _reject(
        self, raw: bytes, reason: str, command_id: str | None, chat: str | None
    ) -> None:
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

    async def _run_fetch(self, running: Running, log: Any) -> None:
        from worker.fetch import Fetcher, FetchOutcome

        s = self.settings
        cmd = running.cmd
        running.started = started = self.clock.monotonic()
        self._on_busy()

        def event(kind: Any, outcome: FetchOutcome | None = None, **extra: Any) -> dict[str, Any]:
            return make_event(
                kind,
                command_id=cmd.command_id,
                chat=cmd.chat.display,
                mode=cmd.mode,
                params=cmd.params,
                worker_id=self.worker_id,
                processed=outcome.processed if outcome else 0,
                errors=outcome.errors if outcome else 0,
                duration_sec=self.clock.monotonic() - started,
                **extra,
            )

        throttle = ProgressThrottle(self.publisher, s.progress_event_interval_seconds)

        progressed = False

        async def on_progress(outcome: FetchOutcome) -> None:
            nonlocal progressed
            throttle.offer(event("progress", outcome))
            if not progressed and (outcome.processed > 0 or outcome.days_completed):
                # Poison detection counts deaths of attempts that made no progress only: a
                # command killed with its worker every few seconds while it advances is not
                # poison. Once per execution: deliveries only grow between executions.
                with contextlib.suppress(*REDIS_DOWN):
                    await self.queue.made_progress(cmd.command_id)
                    progressed = True

        log.info(
            "command started: {} {} ({} days)",
            cmd.mode,
            cmd.params,
            len(cmd.days),
            event="command_started",
            total=len(cmd.days),
        )
        await self.publisher.publish(event("started"))
        fetcher = Fetcher(
            self.telegram,
            self.store,
            tz=s.tz,
            concurrency=s.fetch_concurrency,
            stop=running.stop,
            metrics=self.metrics,
        )
        outcome: FetchOutcome | None = None
        failure: FetchError | None = None
        try:
            outcome = await fetcher.run(cmd, on_progress=on_progress)
        except ShutdownRequested:
            await throttle.drain()
            if running.taken_over:
                log.warning("command taken over after our lease expired; dropped here")
            else:
                log.info(
                    "command interrupted by shutdown after {:.1f}s; progress saved, it goes "
                    "back to the queue (no terminal event: it is not over)",
                    self.clock.monotonic() - started,
                    event="command_interrupted",
                    duration_ms=int((self.clock.monotonic() - started) * 1000),
                )
            return
        except SessionRevoked as exc:
            await throttle.drain()
            self.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
            log.error(
                "session revoked during the command; it goes back to the queue",
                event="session_revoked",
                error_type=exc.type_name,
            )
            self._on_revoked(exc)
            return
        except PermanentError as exc:
            await throttle.drain()
            await self._finish_failed(running, event, exc, retryable=False)
            return
        except FetchError as exc:
            failure = exc
        except asyncio.CancelledError:
            log.info("command cancelled by a forced stop; it goes back to the queue")
            raise
        except Exception as exc:
            await throttle.drain()
            if not await self._internal_error(running, event, exc, log):
                return
            self._finished(running, "error", type(exc).__name__, None)
            log.opt(exception=exc).error(
                "internal error in command; dead-lettered",
                event="command_failed",
                error_type=type(exc).__name__,
                duration_ms=int((self.clock.monotonic() - started) * 1000),
            )
            return
        await throttle.drain()
        if failure is None and outcome is not None and outcome.days_failed:
            failure = outcome.first_error
        if isinstance(failure, StorageError):
            self.storage_failures += 1
        elif outcome is not None and (outcome.days_completed or outcome.processed):
            self.storage_failures = 0
        if failure is not None:
            await self._retry_or_fail(running, event, failure, outcome)
            return
        assert outcome is not None
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
        self, running: Running, event: Callable[..., dict[str, Any]], exc: FetchError, outcome: Any
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
        if isinstance(exc, RateLimited | BreakerOpen):
            delay = max(exc.retry_after, s.command_retry_base_seconds)
        else:
            delay = min(s.command_retry_max_seconds, s.command_retry_base_seconds * 2**done)
        delay *= random.uniform(1.0, 1.1)  # workers failing together do not retry together
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

    async def _storage_dead_letter(
        self,
        running: Running,
        event: Callable[..., dict[str, Any]],
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
        event: Callable[..., dict[str, Any]],
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
        self, running: Running, event: Callable[..., dict[str, Any]], exc: Exception, log: Any
    ) -> bool:
        """Dead letter + ``failed``, on the same ownership terms as every terminal step."""
        cmd = running.cmd
        if not await self._still_ours(running, log):
            return False
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
        return await self._terminal(
            running, log, lambda: self.queue.dead_letter(running.entry, letter, event=failed)
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


__all__ = ["CommandExecutor", "Running", "Tally"]
