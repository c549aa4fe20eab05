"""One execution of a command taken from ``tg_commands``: :class:`CommandExecutor`.

Validate (``MAX_COMMAND_BYTES`` first, never parsed above it) → skip if its id completed already
→ ``started`` → fetch (throttled ``progress``) → one terminal event → ack. Invalid commands:
``failed`` (not retryable) + dead letter. Retryable failures (rate limit above the cap, transient
errors, breaker open, failed days of ``per_day``): ``failed`` with ``retryable: true`` and a
delayed retry, up to ``COMMAND_RETRY_MAX``; then ``failed`` not retryable. ``PermanentError``:
``failed``, not retryable. ``SessionRevoked``: the command goes back to the queue (no event) and
the daemon is told to stop (it marks the session bad and exits 77). The terminal steps
themselves are :mod:`worker.terminal`'s.

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
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.clock import Clock, utc_iso
from fleet.events import EventPublisher, ProgressThrottle, make_event
from fleet.redisconn import REDIS_DOWN, RedisLink
from worker import parts
from worker.commands import CommandLimits, FetchCommand, parse_command, salvage_identity, today_in
from worker.errors import (
    CommandRejected,
    FetchError,
    PermanentError,
    SessionRevoked,
    ShutdownRequested,
    StorageError,
)
from worker.metrics import WorkerMetrics
from worker.queue import WorkQueue
from worker.running import Running, Tally
from worker.settings import WorkerSettings
from worker.terminal import EventFactory, TerminalSteps

if TYPE_CHECKING:
    from worker.fetch import FetchOutcome


class CommandExecutor(TerminalSteps):
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
        super().__init__(
            settings,
            worker_id=worker_id,
            queue=queue,
            publisher=publisher,
            link=link,
            metrics=metrics,
            tally=tally,
            clock=clock,
        )
        self.telegram = telegram
        self.store = store
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

    # --- admission: from raw bytes to a command this worker runs ------------------------------
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
        entry = await self._own_entry(raw, cmd)
        if entry is None:
            return  # taken away from us meanwhile (lease expired): not ours to run
        log = logger.bind(
            worker_id=self.worker_id, command_id=cmd.command_id, chat=cmd.chat.display
        )
        # issue 14: parts of one split command (different days) need not wait for each other;
        # waiting would free the slot and let this worker hoard parts other workers could run.
        lock = self._chat_locks[parts.lock_key(entry, cmd)]
        await self._wait_for_chat(lock, cmd, log)
        try:
            if self.stop.is_set():
                return  # still in the processing list: handed back at shutdown
            if not await self._admit(entry, cmd, log):
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

    async def _own_entry(self, raw: bytes, cmd: FetchCommand) -> bytes | None:
        """The command's entry in our processing list. A command sent without an id gets the
        one assigned here written into that entry first (``None``: it is no longer ours)."""
        if salvage_identity(raw)[0] == cmd.command_id:
            return raw
        new = cmd.to_json().encode("utf-8")
        if not await self.link.call(lambda: self.queue.replace(raw, new), "assign id"):
            return None
        task = asyncio.current_task()
        if task is not None:
            self.held[task] = new
        return new

    async def _wait_for_chat(self, lock: asyncio.Lock, cmd: FetchCommand, log: Any) -> None:
        """One command per chat at a time in this worker; a waiting command frees its slot."""
        if not lock.locked():
            await lock.acquire()
            return
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

    async def _admit(self, entry: bytes, cmd: FetchCommand, log: Any) -> bool:
        """Run it here? Not if its id completed already (acked, skipped, no event), nor while a
        live worker runs the same id (deferred: by then it completed, or that worker died)."""
        done_at = await self.link.call(
            lambda: self.queue.completed_at(cmd.command_id), "completed ids"
        )
        if done_at is not None:
            await self.link.call(lambda: self.queue.ack(entry, cmd.command_id, completed=False))
            log.info(
                "command already completed at {}; skipped (no event: not executed)",
                utc_iso(datetime.fromtimestamp(done_at, UTC)),
            )
            return False
        owner = await self.link.call(lambda: self.queue.claim_run(cmd.command_id), "claim run")
        if owner is None:
            return True
        delay = max(1.0, self.settings.worker_lease_seconds)
        deferred = await self.link.call(
            lambda: self.queue.retry_later(entry, cmd.command_id, delay, count=False),
            "defer",
        )
        if deferred >= 0:  # else recovered away from us meanwhile: not ours to defer
            log.info("same command running on {}; this copy deferred {:g}s", owner, delay)
        return False

    # --- the fetch and its outcome -----------------------------------------------------------
    async def _run_fetch(self, running: Running, log: Any) -> None:
        """``started``, the fetch with throttled ``progress``, then one terminal step (none when
        interrupted, revoked or taken over: the command goes back to the queue)."""
        from worker.fetch import Fetcher

        s = self.settings
        cmd = running.cmd
        running.started = self.clock.monotonic()
        self._on_busy()
        event = self._event_factory(running)
        throttle = ProgressThrottle(self.publisher, s.progress_event_interval_seconds)
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
            outcome = await fetcher.run(
                cmd, on_progress=self._on_progress(running, throttle, event)
            )
        except ShutdownRequested:
            await throttle.drain()
            self._interrupted(running, log)
            return
        except SessionRevoked as exc:
            await throttle.drain()
            self._revoked(exc, log)
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
            await self._internal_error(running, event, exc, log)
            return
        await throttle.drain()
        await self._conclude(running, event, outcome, failure, log)

    async def _conclude(
        self,
        running: Running,
        event: EventFactory,
        outcome: FetchOutcome | None,
        failure: FetchError | None,
        log: Any,
    ) -> None:
        """The fetch ended (failed days count as a failure): count storage failures in a row
        for the daemon's storage pause, then retry, fail or complete."""
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
        await self._complete(running, event, outcome, log)

    def _event_factory(self, running: Running) -> EventFactory:
        """Events of this execution: its identity, counts so far and time since its start."""
        cmd = running.cmd
        started = running.started

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

        return event

    def _on_progress(
        self, running: Running, throttle: ProgressThrottle, event: EventFactory
    ) -> Callable[[FetchOutcome], Awaitable[None]]:
        progressed = False

        async def on_progress(outcome: FetchOutcome) -> None:
            nonlocal progressed
            throttle.offer(event("progress", outcome))
            if not progressed and (outcome.processed > 0 or outcome.days_completed):
                # Poison detection counts deaths of attempts that made no progress only: a
                # command killed with its worker every few seconds while it advances is not
                # poison. Once per execution: deliveries only grow between executions.
                with contextlib.suppress(*REDIS_DOWN):
                    await self.queue.made_progress(running.cmd.command_id)
                    progressed = True

        return on_progress

    def _interrupted(self, running: Running, log: Any) -> None:
        if running.taken_over:
            log.warning("command taken over after our lease expired; dropped here")
            return
        log.info(
            "command interrupted by shutdown after {:.1f}s; progress saved, it goes "
            "back to the queue (no terminal event: it is not over)",
            self.clock.monotonic() - running.started,
            event="command_interrupted",
            duration_ms=int((self.clock.monotonic() - running.started) * 1000),
        )

    def _revoked(self, exc: SessionRevoked, log: Any) -> None:
        self.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
        log.error(
            "session revoked during the command; it goes back to the queue",
            event="session_revoked",
            error_type=exc.type_name,
        )
        self._on_revoked(exc)


__all__ = ["CommandExecutor", "Running", "Tally"]
