"""``python -m worker`` (``run``): the long-running worker, driven by Redis.

Lifecycle::

    connect Redis ──► claim a session lease ──► recover dead workers, claim the worker lease
        ──► connect Telegram ──► take commands (BLMOVE, up to PARALLELISM_MAX at once, one per
        chat) ◄─┐   heartbeat (lease, session lease, health file) every WORKER_LEASE_SECONDS/3
                └── recovery (dead workers, due retries) every RECOVERY_INTERVAL_SECONDS
    SIGTERM/SIGINT ──► stop taking ──► fetches stop after the current page (progress saved)
        ──► commands not finished go back to the head of tg_commands ──► release the session
        ──► close Telegram and Redis ──► exit 0, within SHUTDOWN_GRACE_SECONDS

One execution of a command: validate (``MAX_COMMAND_BYTES`` first, never parsed above it) →
skip if its id completed already → ``started`` → fetch (throttled ``progress``) → one terminal
event → ack. Invalid commands: ``failed`` (not retryable) + dead letter. Retryable failures
(rate limit above the cap, transient errors, breaker open, failed days of ``per_day``):
``failed`` with ``retryable: true`` and a delayed retry, up to ``COMMAND_RETRY_MAX``; then
``failed`` not retryable. ``PermanentError``: ``failed``, not retryable. ``SessionRevoked``:
the command goes back to the queue (no event), the session is marked bad, exit 77.

A command whose id already completed (within ``COMPLETED_IDS_TTL_SECONDS``) is acknowledged and
skipped with a log line and **no event**: it is not executed, and CONTRACT §4 asks for exactly
one terminal event per execution. A command redelivered after its worker died *is* executed
again (days already complete are skipped by the fetcher) and gets its own events.

Exit codes (:class:`worker.cli.Exit`): 0 stopped by a signal; 1 the worker lease or the session
lease was taken over by another process; 69 Redis unreachable for longer than
``REDIS_MAX_OUTAGE_SECONDS``; 77 session revoked (do not restart); 78 configuration error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from loguru import logger
from redis.asyncio import Redis

from governor.keys import Keys
from governor.metrics import (
    WORKER_JOB,
    Exporters,
    WorkerMetrics,
    health_details,
    package_version,
    start_exporters,
)
from governor.settings import ConfigError
from worker.commands import CommandLimits, FetchCommand, parse_command, salvage_identity, today_in
from worker.errors import (
    BreakerOpen,
    CommandRejected,
    FetchError,
    PermanentError,
    RateLimited,
    SessionRevoked,
    ShutdownRequested,
)
from worker.events import EventPublisher, ProgressThrottle, make_event, poison_event
from worker.health import HealthFile
from worker.queue import (
    REDIS_DOWN,
    RedisLink,
    RedisUnavailable,
    WorkQueue,
    connect,
    new_dead_letter,
    recover,
)
from worker.sessions import SessionLeases
from worker.settings import WorkerSettings

T = TypeVar("T")

EXIT_OK = 0
EXIT_LEASE_LOST = 1
EXIT_REDIS_UNAVAILABLE = 69
EXIT_SESSION_REVOKED = 77

VERSION = package_version()
BREAKER = "telegram"  # the breaker_state{component} of the shared Telegram breaker


@dataclass
class _Running:
    """One command being executed by this worker."""

    entry: bytes  # as it is in the processing list
    cmd: FetchCommand
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    taken_over: bool = False  # the lease expired and another worker may run it
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )


class Daemon:
    """The worker process's lifecycle. :meth:`run` returns the exit code."""

    def __init__(self, settings: WorkerSettings, *, install_signals: bool = True) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)
        self.install_signals = install_signals
        self.stop = asyncio.Event()  # stop taking; fetches stop after their page
        self.force = asyncio.Event()  # second signal or grace over: cancel now
        self.exit_code = EXIT_OK
        self.exit_reason = "signal"
        self.worker_id = settings.worker_id or socket.gethostname().split(".")[0] or "worker"
        self.session_name: str | None = None
        self._first_signal_at: float | None = None
        self._running: dict[str, _Running] = {}  # by command_id
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[asyncio.Task[None], bytes] = {}  # task -> its processing-list entry
        self._chat_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slot_freed = asyncio.Event()
        self._waiting = 0  # tasks waiting for their chat's lock
        self._status = "starting"
        self._served = 0
        self.client: Redis | None = None
        self.link = RedisLink(
            settings.redis_display(),
            max_outage_s=settings.redis_max_outage_seconds,
            abort=self.force,
            max_wait_s=min(5.0, settings.backoff_max_seconds),
        )
        self.health = HealthFile(settings.health_file)
        self.telegram: Any = None
        self.store: Any = None
        # Observability: one registry per process, passed down to the gate, the Telegram
        # boundary, the fetcher and the event publisher; served/pushed by self.exporters.
        self.metrics = WorkerMetrics(
            version=VERSION, chat_label_max=settings.metrics_chat_label_max
        )
        self.metrics.set_breaker_state(BREAKER, "closed")
        self.exporters: Exporters | None = None
        self._shipper: Any = None
        self._fresh_until: dict[str, float] = {}  # chat label -> unix time its data is current to
        self._last_success: str | None = None
        self._last_command: dict[str, Any] | None = None

    # --- entry point --------------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        if self.install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self._setup_logging()
        if s.metrics_mode in ("push", "both") and not s.pushgateway_url:
            # Before anything else: a configuration error must not wait for a session first.
            raise ConfigError(f"PUSHGATEWAY_URL: required when METRICS_MODE={s.metrics_mode}")
        self.client = connect(s.redis_dsn(), pop_timeout_s=s.command_pop_timeout_seconds)
        self._write_health("starting")
        logger.info(
            "worker starting: redis {}, data {}, backend {}",
            s.redis_display(),
            s.data_dir,
            s.telegram_backend,
        )
        sessions = SessionLeases(self.client, self.keys, s, link=self.link)
        queue: WorkQueue | None = None
        background: list[asyncio.Task[None]] = []
        try:
            self._write_health("waiting_session")
            self.session_name = await sessions.claim(self.stop)
            if self.session_name is None:
                return self.exit_code
            self.worker_id = s.resolved_worker_id(self.session_name)
            self._setup_logging()  # again: now with the worker id
            self._start_exporters()  # the Pushgateway group is named after the worker id
            queue = WorkQueue(
                self.client,
                self.keys,
                self.worker_id,
                lease_s=s.worker_lease_seconds,
                completed_ttl_s=s.completed_ids_ttl_seconds,
                dead_letters_max=s.dead_letters_max,
                dead_letter_payload_max_bytes=s.dead_letter_payload_max_bytes,
            )
            publisher = EventPublisher(
                self.client,
                self.keys,
                stream_maxlen=s.events_stream_maxlen,
                max_elapsed_s=s.event_publish_max_seconds,
                on_retry=self._record_retry,
            )
            if not await self._claim_worker_lease(queue, publisher):
                return self.exit_code
            background = [
                asyncio.create_task(self._heartbeat(queue, sessions), name="heartbeat"),
                asyncio.create_task(self._recovery(publisher), name="recovery"),
            ]
            if not await self._connect_telegram(sessions):
                return self.exit_code
            self._status = "idle"
            logger.info(
                "worker {} ready on session {} (parallelism {})",
                self.worker_id,
                self.session_name,
                s.parallelism_max,
            )
            await self._take_loop(queue, publisher)
        except RedisUnavailable as exc:
            self._begin_stop(EXIT_REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
        except SessionRevoked as exc:
            self._begin_stop(EXIT_SESSION_REVOKED, f"session revoked: {exc}")
        finally:
            await self._shutdown(queue, sessions, background)
        return self.exit_code

    # --- signals and stopping -----------------------------------------------------------------
    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            logger.info(
                "{} received: stopping (grace {:.0f}s); a second signal stops faster",
                sig.name,
                self.settings.shutdown_grace_seconds,
            )
            self._begin_stop(EXIT_OK, sig.name)
        elif now - self._first_signal_at < 1.0:
            # rq's lesson: process managers and terminals often deliver the same stop twice.
            return
        elif not self.force.is_set():
            logger.warning("second {}: stopping now (files stay valid)", sig.name)
            self.force.set()
            for task in list(self._tasks):
                task.cancel()

    def _begin_stop(self, code: int, reason: str) -> None:
        if not self.stop.is_set():
            self.exit_code = code
            self.exit_reason = reason
            self.stop.set()
        for running in self._running.values():
            running.stop.set()

    # --- startup --------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        from governor.logs import setup_logging

        self._shipper = setup_logging(self.settings, worker_id=self.worker_id, component="worker")
        self.metrics.watch_log_shipper(self._shipper)

    def _start_exporters(self) -> None:
        """``/metrics``, ``/health``, ``/health/details`` on ``METRICS_PORT`` and/or the pusher
        (``METRICS_MODE``), under the grouping key ``{job, instance=<worker_id>}``."""
        if self.settings.effective_metrics_mode == "off" or self.exporters is not None:
            return
        self.exporters = start_exporters(
            self.settings,
            self.metrics.registry,
            job=WORKER_JOB,
            instance=self.worker_id,
            health=self._healthy,
            details=self._details,
        )

    def _healthy(self) -> bool:
        """``/health``: 200 while taking commands with Redis reachable, else 503. Runs in the
        HTTP server's thread: reads plain attributes only."""
        return self._status in ("idle", "busy") and self.link.up and not self.stop.is_set()

    def _details(self) -> dict[str, object]:
        running = [
            {
                "command_id": r.cmd.command_id,
                "chat": r.cmd.chat.display,
                "mode": r.cmd.mode,
                "started": r.started_at,
            }
            for r in list(self._running.values())
        ]
        telegram = self.telegram
        return health_details(
            version=VERSION,
            telegram_connected=bool(telegram is not None and telegram.connected),
            session=self.session_name,
            redis_ok=self.link.up,
            breaker=self.metrics.breaker_state_of(BREAKER),
            current_command=running[0] if running else None,
            last_success=self._last_success,
            worker_id=self.worker_id,
            status=self._status,
            running=running,
            commands_served=self._served,
            last_command=self._last_command,
        )

    def _record_retry(self, target: str, reason: str, delay_s: float) -> None:
        self.metrics.record_retry(target, reason, delay_s)
        logger.debug(
            "{} failed ({}); retry in {:.2f}s",
            target,
            reason,
            delay_s,
            event="retry",
            error_type=reason,
            wait_seconds=round(delay_s, 3),
        )

    async def _claim_worker_lease(self, queue: WorkQueue, publisher: EventPublisher) -> bool:
        """Recover dead workers (our own previous run included, once its lease expired), then
        hold our lease. Waits while a process holds a lease under our worker id."""
        s = self.settings
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session": self.session_name,
            "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        warned = False
        scan = True
        while not self.stop.is_set():
            report = await self.link.call(
                lambda sc=scan: recover(  # type: ignore[misc]
                    self._redis,
                    self.keys,
                    max_deliveries=s.command_max_deliveries,
                    dead_letters_max=s.dead_letters_max,
                    scan=sc,
                ),
                "recovery",
            )
            scan = False
            await self._after_recovery(report, publisher)
            got = await self.link.call(lambda: queue.claim_lease(info), "worker lease")
            if got in (1, 2):
                left = await self.link.call(queue.release_all, "release leftovers")
                if left > 0:
                    logger.info("handed back {} commands left by a previous run", left)
                return True
            if not warned:
                warned = True
                logger.warning(
                    "worker id {} is leased by another process (a previous run that died, or "
                    "a duplicate WORKER_ID); waiting up to {:.0f}s for the lease to expire",
                    self.worker_id,
                    s.worker_lease_seconds,
                )
            await self._sleep(min(1.0, s.worker_lease_seconds / 3))
        return False

    async def _connect_telegram(self, sessions: SessionLeases) -> bool:
        from worker.storage import DayStore
        from worker.telegram import TelegramSession

        s = self.settings
        gate: Any = None
        if s.rate_limit_strategy != "off":
            from governor.fleet_gate import FleetGate
            from worker.clock import SystemClock

            gate = FleetGate(
                self._redis,
                self.keys,
                self.session_name or "sim",
                s,
                SystemClock(),
                worker_id=self.worker_id,
                metrics=self.metrics,
            )
        self.telegram = TelegramSession(
            s, self.session_name or "sim", gate=gate, metrics=self.metrics
        )
        self.store = DayStore(s.data_dir, schema_version=s.schema_version, timezone=s.day_timezone)
        attempt = 0
        while not self.stop.is_set():
            try:
                await self.telegram.connect()
                return True
            except SessionRevoked as exc:
                await self._session_revoked(sessions, exc)
                return False
            except FetchError as exc:
                attempt += 1
                delay = min(s.backoff_max_seconds, s.backoff_base_seconds * 2**attempt)
                self.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
                logger.warning(
                    "telegram connect failed ({}: {}); retrying in {:.1f}s",
                    exc.type_name,
                    exc,
                    delay,
                    event="telegram_connect_failed",
                    error_type=exc.type_name,
                    wait_seconds=round(delay, 3),
                )
                await self._sleep(delay)
        return False

    async def _session_revoked(self, sessions: SessionLeases, exc: SessionRevoked) -> None:
        self._begin_stop(EXIT_SESSION_REVOKED, f"session revoked: {exc}")
        with contextlib.suppress(*REDIS_DOWN):
            await sessions.mark_bad(str(exc), self.worker_id)

    # --- taking -------------------------------------------------------------------------------
    async def _take_loop(self, queue: WorkQueue, publisher: EventPublisher) -> None:
        s = self.settings
        reconciled = time.monotonic()
        while not self.stop.is_set():
            # A command waiting for its chat (another command on it runs here) takes no slot,
            # but at most PARALLELISM_MAX of them are held, so one chat cannot hoard the queue.
            active = len(self._tasks) - self._waiting
            if active >= s.parallelism_max or len(self._tasks) >= 2 * s.parallelism_max:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, 1.0)
                continue
            if time.monotonic() - reconciled >= s.worker_lease_seconds:
                await self._adopt_orphans(queue, publisher)
                reconciled = time.monotonic()
            raw = await self.link.call(
                lambda: queue.take(s.command_pop_timeout_seconds), "take command"
            )
            if raw is None:
                continue
            if self.stop.is_set():
                break  # it stays in the processing list; release_all hands it back
            self._spawn(queue, publisher, raw)

    def _spawn(self, queue: WorkQueue, publisher: EventPublisher, raw: bytes) -> None:
        task = asyncio.create_task(self._execute(queue, publisher, raw))
        self._held[task] = raw
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _adopt_orphans(self, queue: WorkQueue, publisher: EventPublisher) -> None:
        """Run what is in our processing list but in no task of ours: a BLMOVE whose reply was
        lost with its connection (Redis restarted after moving the command) leaves it there.
        Called between takes only, so no BLMOVE is in flight."""
        known = Counter(self._held.values())
        for raw in await self.link.call(queue.held, "reconcile"):
            if known[raw] > 0:
                known[raw] -= 1
                continue
            logger.warning("running a command found in our processing list without a task")
            self._spawn(queue, publisher, raw)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._held.pop(task, None)
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, RedisUnavailable):
                self._begin_stop(EXIT_REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
            else:
                logger.opt(exception=exc).error("command task crashed")

    # --- one command ----------------------------------------------------------------------------
    async def _execute(self, queue: WorkQueue, publisher: EventPublisher, raw: bytes) -> None:
        s = self.settings
        logger.debug("command received ({} bytes)", len(raw), event="command_received")
        if len(raw) > s.max_command_bytes:
            await self._reject(
                queue,
                publisher,
                raw,
                f"command is {len(raw)} bytes, more than MAX_COMMAND_BYTES={s.max_command_bytes}",
                None,
                None,
            )
            return
        limits = CommandLimits(
            today=today_in(s.tz, datetime.now(UTC)),
            max_range_days=s.max_range_days,
            max_command_bytes=s.max_command_bytes,
            default_strategy=s.fetch_strategy,
        )
        try:
            cmd = parse_command(raw, limits)
        except CommandRejected as exc:
            cid, chat = salvage_identity(raw)
            await self._reject(queue, publisher, raw, str(exc), cid, chat)
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
            await self._execute_parsed(queue, publisher, raw, cmd)

    async def _execute_parsed(
        self, queue: WorkQueue, publisher: EventPublisher, raw: bytes, cmd: FetchCommand
    ) -> None:
        s = self.settings
        log = logger.bind(worker_id=self.worker_id)
        entry = raw
        if salvage_identity(raw)[0] != cmd.command_id:
            new = cmd.to_json().encode("utf-8")
            if not await self.link.call(lambda: queue.replace(raw, new), "assign id"):
                return  # taken away from us meanwhile (lease expired): not ours to run
            entry = new
            task = asyncio.current_task()
            if task is not None:
                self._held[task] = entry
        log = log.bind(command_id=cmd.command_id, chat=cmd.chat.display)
        lock = self._chat_locks[cmd.chat.key]
        if lock.locked():
            log.info("chat {} is busy in this worker; the command waits", cmd.chat.display)
            self._waiting += 1
            self._slot_freed.set()
            try:
                await lock.acquire()
            finally:
                self._waiting -= 1
        else:
            await lock.acquire()
        try:
            if self.stop.is_set():
                return  # still in the processing list: handed back at shutdown
            done_at = await self.link.call(
                lambda: queue.completed_at(cmd.command_id), "completed ids"
            )
            if done_at is not None:
                await self.link.call(lambda: queue.ack(entry, cmd.command_id, completed=False))
                log.info(
                    "command already completed at {}; skipped (no event: not executed)",
                    datetime.fromtimestamp(done_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                return
            owner = await self.link.call(lambda: queue.claim_run(cmd.command_id), "claim run")
            if owner is not None:
                # The same command_id is being executed by a live worker: run it at most once.
                # Come back later; by then it completed (skipped) or that worker died (ours).
                delay = max(1.0, s.worker_lease_seconds)
                await self.link.call(
                    lambda: queue.retry_later(entry, cmd.command_id, delay, count=False), "defer"
                )
                log.info("same command running on {}; this copy deferred {:g}s", owner, delay)
                return
            running = _Running(entry=entry, cmd=cmd)
            if self.stop.is_set():
                running.stop.set()
            self._running[cmd.command_id] = running
            try:
                await self._run_fetch(queue, publisher, running, log)
            finally:
                self._running.pop(cmd.command_id, None)
        finally:
            lock.release()

    async def _reject(
        self,
        queue: WorkQueue,
        publisher: EventPublisher,
        raw: bytes,
        reason: str,
        command_id: str | None,
        chat: str | None,
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
        await publisher.publish(event)
        await self.link.call(lambda: queue.dead_letter(raw, letter), "dead letter")

    async def _run_fetch(
        self, queue: WorkQueue, publisher: EventPublisher, running: _Running, log: Any
    ) -> None:
        from worker.fetch import Fetcher, FetchOutcome

        s = self.settings
        cmd = running.cmd
        running.started = started = time.monotonic()
        self._status = "busy"

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
                duration_sec=time.monotonic() - started,
                **extra,
            )

        throttle = ProgressThrottle(publisher, s.progress_event_interval_seconds)

        async def on_progress(outcome: FetchOutcome) -> None:
            throttle.offer(event("progress", outcome))

        log.info(
            "command started: {} {} ({} days)",
            cmd.mode,
            cmd.params,
            len(cmd.days),
            event="command_started",
            total=len(cmd.days),
        )
        await publisher.publish(event("started"))
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
                    time.monotonic() - started,
                    event="command_interrupted",
                    duration_ms=int((time.monotonic() - started) * 1000),
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
            self._begin_stop(EXIT_SESSION_REVOKED, f"session revoked: {exc}")
            return
        except PermanentError as exc:
            await throttle.drain()
            await self._finish_failed(queue, publisher, running, event, exc, retryable=False)
            return
        except FetchError as exc:
            failure = exc
        except asyncio.CancelledError:
            log.info("command cancelled by a forced stop; it goes back to the queue")
            raise
        except Exception as exc:
            await throttle.drain()
            self._finished(running, "error", type(exc).__name__, None)
            log.opt(exception=exc).error(
                "internal error in command; dead-lettered",
                event="command_failed",
                error_type=type(exc).__name__,
                duration_ms=int((time.monotonic() - started) * 1000),
            )
            await self._internal_error(queue, publisher, running, event, exc)
            return
        await throttle.drain()
        if failure is None and outcome is not None and outcome.days_failed:
            failure = outcome.first_error
        if failure is not None:
            await self._retry_or_fail(queue, publisher, running, event, failure, outcome)
            return
        assert outcome is not None
        if not await self._still_ours(queue, running, log):
            return
        status = "partial" if outcome.days_partial else "ok"
        await publisher.publish(event("completed", outcome, status=status, files=outcome.files))
        await self.link.call(lambda: queue.ack(running.entry, cmd.command_id, completed=True))
        self._served += 1
        self._finished(running, status, None, outcome)
        self._last_success = self._last_command["finished"] if self._last_command else None
        log.bind(**self._summary(running, outcome)).info(
            "command completed: {} messages, {} files, days complete {}, skipped {}, partial {}",
            outcome.processed,
            len(outcome.files),
            len(outcome.days_completed),
            len(outcome.days_skipped),
            len(outcome.days_partial),
            event="command_completed",
        )

    def _summary(self, running: _Running, outcome: Any) -> dict[str, Any]:
        """The counts every command's last log line carries."""
        cmd = running.cmd
        done = (
            len(outcome.days_completed) + len(outcome.days_skipped) + len(outcome.days_partial)
            if outcome is not None
            else 0
        )
        return {
            "duration_ms": int((time.monotonic() - running.started) * 1000),
            "message_count": outcome.fetched if outcome is not None else 0,
            "processed": outcome.processed if outcome is not None else 0,
            "days_done": done,
            "total": len(cmd.days),
        }

    def _finished(
        self, running: _Running, status: str, error_type: str | None, outcome: Any
    ) -> None:
        """Metrics of one finished execution, and what ``/health/details`` shows of it."""
        m = self.metrics
        cmd = running.cmd
        m.commands_total.labels(status=status).inc()
        m.observe_fetch(cmd.chat.display, time.monotonic() - running.started)
        if error_type is not None:
            m.fetch_errors_total.labels(type=error_type).inc()
        if outcome is not None and outcome.fresh_until is not None:
            label = m.chat_label(cmd.chat.display)
            fresh = outcome.fresh_until.timestamp()
            # Per chat the freshest data counts (a backfill of old days does not make the chat
            # look stale); in the shared "other" bucket the last write wins.
            if label != "other":
                fresh = max(fresh, self._fresh_until.get(label, fresh))
            self._fresh_until[label] = fresh
            m.fetch_lag_seconds.labels(chat=label).set(max(0.0, time.time() - fresh))
        self._last_command = {
            "command_id": cmd.command_id,
            "chat": cmd.chat.display,
            "status": status,
            "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    async def _still_ours(self, queue: WorkQueue, running: _Running, log: Any) -> bool:
        """Is the command still in our processing list? (Not if our lease expired during an
        outage and a recovery gave it to another worker: then that execution reports.)"""
        if running.taken_over:
            return False
        held = await self.link.call(lambda: queue.holds(running.entry), "ownership")
        if not held:
            running.taken_over = True
            log.warning("command was recovered by another worker while we ran it; no event")
        return held

    async def _retry_or_fail(
        self,
        queue: WorkQueue,
        publisher: EventPublisher,
        running: _Running,
        event: Callable[..., dict[str, Any]],
        exc: FetchError,
        outcome: Any,
    ) -> None:
        s = self.settings
        cmd = running.cmd
        log = logger.bind(
            worker_id=self.worker_id, command_id=cmd.command_id, chat=cmd.chat.display
        )
        if not await self._still_ours(queue, running, log):
            return
        done = await self.link.call(lambda: queue.retries(cmd.command_id), "retry count")
        if not exc.retryable or done >= s.command_retry_max:
            why = "" if not exc.retryable else f" (gave up after {done} retries)"
            await self._finish_failed(
                queue, publisher, running, event, exc, retryable=False, suffix=why, outcome=outcome
            )
            return
        if isinstance(exc, RateLimited | BreakerOpen):
            delay = max(exc.retry_after, s.command_retry_base_seconds)
        else:
            delay = min(s.command_retry_max_seconds, s.command_retry_base_seconds * 2**done)
        delay *= random.uniform(1.0, 1.1)  # workers failing together do not retry together
        message = f"{exc} (retry {done + 1}/{s.command_retry_max} in {delay:.0f}s)"
        await publisher.publish(
            event(
                "failed",
                outcome,
                error_type=exc.type_name,
                error_message=message,
                retryable=True,
            )
        )
        await self.link.call(
            lambda: queue.retry_later(running.entry, cmd.command_id, delay), "retry later"
        )
        self._finished(running, "retrying", exc.type_name, outcome)
        log.bind(error_type=exc.type_name, **self._summary(running, outcome)).warning(
            "command failed, will retry: {}",
            message,
            event="command_failed",
            retryable=True,
            wait_seconds=round(delay, 3),
        )

    async def _finish_failed(
        self,
        queue: WorkQueue,
        publisher: EventPublisher,
        running: _Running,
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
        if not await self._still_ours(queue, running, log):
            return
        await publisher.publish(
            event(
                "failed",
                outcome,
                error_type=exc.type_name,
                error_message=f"{exc}{suffix}",
                retryable=retryable,
            )
        )
        await self.link.call(lambda: queue.ack(running.entry, cmd.command_id, completed=False))
        self._finished(running, "failed", exc.type_name, outcome)
        log.bind(error_type=exc.type_name, **self._summary(running, outcome)).error(
            "command failed: {}{}", exc, suffix, event="command_failed", retryable=False
        )

    async def _internal_error(
        self,
        queue: WorkQueue,
        publisher: EventPublisher,
        running: _Running,
        event: Callable[..., dict[str, Any]],
        exc: Exception,
    ) -> None:
        cmd = running.cmd
        letter = new_dead_letter(
            running.entry,
            reason=f"internal error: {type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
            command_id=cmd.command_id,
            chat=cmd.chat.display,
            worker_id=self.worker_id,
            source="internal",
        )
        await publisher.publish(
            event(
                "failed",
                error_type=type(exc).__name__,
                error_message=f"internal error: {exc} (dead letter {letter.id})",
                retryable=False,
            )
        )
        await self.link.call(lambda: queue.dead_letter(running.entry, letter), "dead letter")

    # --- background -----------------------------------------------------------------------------
    async def _heartbeat(self, queue: WorkQueue, sessions: SessionLeases) -> None:
        s = self.settings
        interval = s.worker_lease_seconds / 3
        info = {"host": socket.gethostname(), "pid": os.getpid(), "session": self.session_name}
        while not self.force.is_set():
            try:
                try:
                    got = await queue.claim_lease(info)
                except REDIS_DOWN:  # one stale pooled connection after a restart: once more
                    got = await queue.claim_lease(info)
                if got == 0:
                    logger.error("worker lease {} is held by another process", self.worker_id)
                    self._begin_stop(EXIT_LEASE_LOST, "worker lease taken over")
                elif got == 2:
                    logger.warning("worker lease had expired (redis outage?); re-claimed it")
                    for running in list(self._running.values()):
                        if not await queue.holds(running.entry):
                            running.taken_over = True
                            running.stop.set()
                if not await sessions.refresh():
                    logger.error("session {} is now held by another process", self.session_name)
                    self._begin_stop(EXIT_LEASE_LOST, "session lease taken over")
                self.metrics.command_queue_length.set(await self._redis.llen(self.keys.commands))
                self.link.mark_up()
            except REDIS_DOWN as exc:
                self.link.mark_down(exc)
                if self.link.exhausted() and not self.stop.is_set():
                    self._begin_stop(
                        EXIT_REDIS_UNAVAILABLE,
                        f"redis unreachable for {self.link.outage_seconds():.0f}s",
                    )
            self._write_health()
            self._refresh_lag()
            await self._sleep(interval, until=self.force)

    def _refresh_lag(self) -> None:
        """``fetch_lag_seconds`` grows while nothing is fetched: recompute it every heartbeat."""
        now = time.time()
        for label, fresh in list(self._fresh_until.items()):
            self.metrics.fetch_lag_seconds.labels(chat=label).set(max(0.0, now - fresh))

    async def _recovery(self, publisher: EventPublisher) -> None:
        s = self.settings
        while not self.stop.is_set():
            await self._sleep(s.recovery_interval_seconds * random.uniform(0.8, 1.2))
            if self.stop.is_set():
                break
            if not self.link.up or self.link.since_back() < s.worker_lease_seconds:
                # Every lease expired during the outage: give the live workers one lease period
                # to heart-beat again before treating them as dead.
                continue
            try:
                report = await recover(
                    self._redis,
                    self.keys,
                    max_deliveries=s.command_max_deliveries,
                    dead_letters_max=s.dead_letters_max,
                )
            except REDIS_DOWN:
                continue  # the heartbeat reports the outage
            await self._after_recovery(report, publisher)

    async def _after_recovery(self, report: Any, publisher: EventPublisher) -> None:
        """Log what a recovery did; a ``failed`` event for each command it dead-lettered."""
        for wid, count in report.recovered.items():
            logger.warning("recovered {} commands of dead worker {}", count, wid)
        if report.promoted:
            logger.info("{} delayed retries back on the queue", report.promoted)
        for letter in report.dead_lettered:
            logger.bind(command_id=letter.command_id, chat=letter.chat).error(
                "dead-lettered: {}", letter.reason
            )
            await publisher.publish(poison_event(letter, self.worker_id))

    def _write_health(self, status: str | None = None) -> None:
        if status is not None:
            self._status = status
        elif self.stop.is_set():
            self._status = "stopping"
        elif not self.link.up:
            self._status = "redis_down"
        elif self._status in ("idle", "busy"):
            self._status = "busy" if self._running else "idle"
        self.health.write(
            self._status,
            worker_id=self.worker_id,
            session=self.session_name,
            redis="up" if self.link.up else "down",
            served=self._served,
            current=[
                {"command_id": r.cmd.command_id, "chat": r.cmd.chat.display}
                for r in self._running.values()
            ],
        )

    # --- shutdown -------------------------------------------------------------------------------
    async def _shutdown(
        self,
        queue: WorkQueue | None,
        sessions: SessionLeases,
        background: list[asyncio.Task[None]],
    ) -> None:
        s = self.settings
        self._begin_stop(self.exit_code, self.exit_reason)
        began = time.monotonic()
        logger.info(
            "shutdown started ({}): {} commands running, grace {:.0f}s",
            self.exit_reason,
            len(self._tasks),
            s.shutdown_grace_seconds,
            event="shutdown_started",
            reason=self.exit_reason,
            running=len(self._tasks),
        )
        # Leave time after the fetches for handing commands back and closing, inside the grace.
        margin = min(5.0, s.shutdown_grace_seconds * 0.3)
        deadline = began + max(0.5, s.shutdown_grace_seconds - margin)
        self._write_health("stopping")
        if self._tasks:
            logger.info("waiting for {} running commands to checkpoint", len(self._tasks))
            pending = set(self._tasks)
            while pending and not self.force.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _done, pending = await asyncio.wait(pending, timeout=min(left, 0.2))
            if pending:
                logger.warning("cancelling {} commands (grace over or forced)", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Redis calls below give up at the hard end of the grace period.
        hard_end = began + s.shutdown_grace_seconds - 1.0
        guard = asyncio.get_running_loop().call_later(
            max(0.1, hard_end - time.monotonic()), self.force.set
        )
        try:
            if queue is not None:
                with contextlib.suppress(RedisUnavailable):
                    moved = await self.link.call(queue.release_all, "hand back commands")
                    if moved > 0:
                        logger.info("handed {} commands back to the head of the queue", moved)
                    elif moved < 0:
                        logger.warning("lease held elsewhere; recovery will hand our commands back")
                    await self.link.call(queue.drop_lease, "drop lease")
                    await self.link.call(
                        lambda: self._redis.hdel(self.keys.workers, self.worker_id), "unregister"
                    )
            with contextlib.suppress(RedisUnavailable):
                if self.exit_code == EXIT_SESSION_REVOKED:
                    await self.link.call(
                        lambda: sessions.mark_bad(self.exit_reason, self.worker_id), "mark bad"
                    )
                await self.link.call(sessions.release, "release session")
        finally:
            guard.cancel()
            if self.telegram is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.telegram.close(), timeout=3.0)
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await self.client.aclose()
            self.health.remove()
            waited = time.monotonic() - began
            last = self._last_command or {}
            logger.info(
                "worker {} stopped ({}), exit {}, {} commands served, {:.1f}s to stop, "
                "last command {}",
                self.worker_id,
                self.exit_reason,
                self.exit_code,
                self._served,
                waited,
                last.get("command_id", "none"),
                event="shutdown_completed",
                reason=self.exit_reason,
                exit_code=self.exit_code,
                waited_seconds=round(waited, 3),
                duration_ms=int(waited * 1000),
                commands_served=self._served,
                last_command_id=last.get("command_id"),
                last_command_chat=last.get("chat"),
                last_command_status=last.get("status"),
            )
            await self._stop_exporters(began)

    async def _stop_exporters(self, began: float) -> None:
        """The last stage: final push and delete of our Pushgateway group, stop serving, then
        flush the log shipper (so what the exporters said on the way out is shipped too)."""
        left = self.settings.shutdown_grace_seconds - (time.monotonic() - began)
        if self.exporters is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.exporters.stop, max(1.0, min(5.0, left - 0.5)))
        if self._shipper is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._shipper.close, max(0.5, min(5.0, left - 1.0)))

    # --- helpers --------------------------------------------------------------------------------
    @property
    def _redis(self) -> Redis:
        assert self.client is not None
        return self.client

    async def _sleep(self, seconds: float, *, until: asyncio.Event | None = None) -> None:
        await self._wait_any(until or self.stop, seconds)

    @staticmethod
    async def _wait_any(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)


def run(settings: WorkerSettings) -> int:
    """Run the daemon until stopped; the process's exit code."""
    return asyncio.run(Daemon(settings).run())


__all__ = ["Daemon", "run"]
