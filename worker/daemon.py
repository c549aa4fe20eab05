"""``python -m worker`` (``run``): the long-running worker, driven by Redis.

Lifecycle::

    connect Redis ──► claim a session lease ──► recover dead workers, claim the worker lease
        ──► connect Telegram ──► take commands (BLMOVE, up to PARALLELISM_MAX at once, one per
        chat) ◄─┐   heartbeat (lease, session lease, health file) every WORKER_LEASE_SECONDS/3
                └── recovery (dead workers, due retries) every RECOVERY_INTERVAL_SECONDS
    SIGTERM/SIGINT ──► stop taking ──► fetches stop after the current page (progress saved)
        ──► commands not finished go back to the head of tg_commands ──► release the session
        ──► close Telegram and Redis ──► exit 0, within SHUTDOWN_GRACE_SECONDS

Each command taken runs in its own task, executed by :class:`worker.executor.CommandExecutor`
(validation, events, retries, ack). A ``SessionRevoked`` there puts the command back (no event);
the daemon then marks the session bad and exits 77.

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
from collections import Counter
from pathlib import Path
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.clock import Clock, SystemClock, utc_iso
from fleet.events import EventPublisher, poison_event
from fleet.exitcodes import Exit
from fleet.exporters import Exporters, health_details, start_exporters
from fleet.keys import Keys
from fleet.metrics import WORKER_JOB, package_version
from fleet.recovery import recover
from fleet.redisconn import REDIS_DOWN, RedisLink, RedisUnavailable, connect
from fleet.settings import ConfigError
from worker.backend import backend_for
from worker.errors import FetchError, SessionRevoked
from worker.executor import CommandExecutor, Running, Tally
from worker.health import HealthFile
from worker.metrics import WorkerMetrics
from worker.queue import WorkQueue
from worker.sessions import SessionLeases, take_over_dead_holder
from worker.settings import WorkerSettings

VERSION = package_version()
# Executions in a row failing on this worker's own storage before it stops taking commands
# (and reports unhealthy) until a probe write in DATA_DIR succeeds again.
STORAGE_FAILURES_PAUSE = 3
BREAKER = "telegram"  # the breaker_state{component} of the shared Telegram breaker


class Daemon:
    """The worker process's lifecycle. :meth:`run` returns the exit code."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        install_signals: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()  # every time this module reads
        self.keys = Keys(settings.redis_key_prefix)
        self.install_signals = install_signals
        self.stop = asyncio.Event()  # stop taking; fetches stop after their page
        self.force = asyncio.Event()  # second signal or grace over: cancel now
        # Background tasks (heartbeat) end when this is set. A flag, not only a cancellation:
        # Python 3.11's wait_for drops a cancellation that races its inner future's completion
        # (redis-py sends every command through one), and a heartbeat that lost its
        # cancellation would renew our leases forever while the shutdown waited for it.
        self.halt = asyncio.Event()
        self.exit_code: int = Exit.OK
        self.exit_reason = "signal"
        self.worker_id = settings.worker_id or socket.gethostname().split(".")[0] or "worker"
        self.session_name: str | None = None
        self._first_signal_at: float | None = None
        self._running: dict[str, Running] = {}  # by command_id
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[asyncio.Task[None], bytes] = {}  # task -> its processing-list entry
        self._slot_freed = asyncio.Event()
        self._status = "starting"
        self.tally = Tally()  # written by the executor, reported here
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
        self.backend = backend_for(s)
        sessions = SessionLeases(
            self.client, self.keys, s, link=self.link, fixed_names=self.backend.session_names
        )
        queue: WorkQueue | None = None
        background: list[asyncio.Task[None]] = []
        try:
            self._write_health("waiting_session")
            # Refreshed every round of the wait, so that Docker's health check (file age) does
            # not take a worker waiting for a free session for a dead one.
            self.session_name = await sessions.claim(
                self.stop, on_wait=lambda: self._write_health("waiting_session")
            )
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
                events_maxlen=s.events_stream_maxlen,
                clock=self.clock,
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
            executor = CommandExecutor(
                s,
                worker_id=self.worker_id,
                queue=queue,
                publisher=publisher,
                link=self.link,
                telegram=self.telegram,
                store=self.store,
                metrics=self.metrics,
                tally=self.tally,
                running=self._running,
                held=self._held,
                stop=self.stop,
                slot_freed=self._slot_freed,
                on_busy=self._on_busy,
                on_revoked=self._on_revoked,
                clock=self.clock,
            )
            await self._take_loop(queue, executor)
        except RedisUnavailable as exc:
            self._begin_stop(Exit.REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
        except SessionRevoked as exc:
            self._begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")
        finally:
            await self._shutdown(queue, sessions, background)
        return self.exit_code

    # --- signals and stopping -----------------------------------------------------------------
    def _on_signal(self, sig: signal.Signals) -> None:
        now = self.clock.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            logger.info(
                "{} received: stopping (grace {:.0f}s); a second signal stops faster",
                sig.name,
                self.settings.shutdown_grace_seconds,
            )
            self._begin_stop(Exit.OK, sig.name)
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

    def _on_revoked(self, exc: SessionRevoked) -> None:
        """A command's fetch found the session revoked."""
        self._begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")

    def _on_busy(self) -> None:
        """A command's fetch starts."""
        self._status = "busy"

    # --- startup --------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        from fleet.logs import setup_logging

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
            last_success=self.tally.last_success,
            worker_id=self.worker_id,
            status=self._status,
            running=running,
            commands_served=self.tally.served,
            last_command=self.tally.last_command,
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
            "started": utc_iso(self.clock.now()),
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
            dead = await self.link.call(
                lambda: take_over_dead_holder(self._redis, queue.lease_key, queue.token),
                "dead predecessor",
            )
            if dead is not None:
                # Our predecessor under this WORKER_ID was killed: its lease is gone now, and
                # the next recovery hands its commands back (counting the delivery) at once.
                logger.warning(
                    "worker lease {} was held by a dead process ({}); taking it over",
                    self.worker_id,
                    dead.rpartition("|")[2],
                )
                scan = True
                continue
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
        from worker.storage import store_from_settings
        from worker.telegram import TelegramSession

        s = self.settings
        gate: Any = None
        if s.rate_limit_strategy != "off":
            from fleet.clock import SystemClock
            from worker.fleet_gate import FleetGate

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
            s,
            self.session_name or "sim",
            gate=gate,
            metrics=self.metrics,
            client_factory=self.backend.client_factory,
        )
        self.store = store_from_settings(s)
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
        self._begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")
        with contextlib.suppress(*REDIS_DOWN):
            await sessions.mark_bad(str(exc), self.worker_id)

    # --- taking -------------------------------------------------------------------------------
    async def _take_loop(self, queue: WorkQueue, executor: CommandExecutor) -> None:
        s = self.settings
        reconciled = self.clock.monotonic()
        while not self.stop.is_set():
            # A command waiting for its chat (another command on it runs here) takes no slot,
            # but at most PARALLELISM_MAX of them are held, so one chat cannot hoard the queue.
            active = len(self._tasks) - executor.waiting
            if active >= s.parallelism_max or len(self._tasks) >= 2 * s.parallelism_max:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, 1.0)
                continue
            if executor.storage_failures >= STORAGE_FAILURES_PAUSE:
                await self._storage_pause(executor)
                continue
            if self.clock.monotonic() - reconciled >= s.worker_lease_seconds:
                await self._adopt_orphans(queue, executor)
                reconciled = self.clock.monotonic()
            raw = await self.link.call(
                lambda: queue.take(s.command_pop_timeout_seconds), "take command"
            )
            if raw is None:
                continue
            if self.stop.is_set():
                break  # it stays in the processing list; release_all hands it back
            self._spawn(executor, raw)

    async def _storage_pause(self, executor: CommandExecutor) -> None:
        """Our storage failed several executions in a row (disk full, read-only mount, I/O
        errors): take nothing (other workers take the commands), report unhealthy, and probe
        the storage until a write works again."""
        if self._status != "storage_error":
            logger.error(
                "{} commands in a row failed on storage; not taking commands until {} is "
                "writable again",
                executor.storage_failures,
                self.settings.data_dir,
                event="storage_unhealthy",
            )
            self._write_health("storage_error")
        await self._sleep(min(5.0, max(0.5, self.settings.worker_lease_seconds / 3)))
        if self.stop.is_set():
            return
        problem = await asyncio.to_thread(_probe_storage, self.settings.data_dir, self.worker_id)
        if problem is None:
            logger.info("storage is writable again; taking commands", event="storage_healthy")
            executor.storage_failures = 0
            self._write_health("busy" if self._running else "idle")
        else:
            logger.debug("storage still failing: {}", problem)

    def _spawn(self, executor: CommandExecutor, raw: bytes) -> None:
        task = asyncio.create_task(executor.execute(raw))
        self._held[task] = raw
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _adopt_orphans(self, queue: WorkQueue, executor: CommandExecutor) -> None:
        """Run what is in our processing list but in no task of ours: a BLMOVE whose reply was
        lost with its connection (Redis restarted after moving the command) leaves it there.
        Called between takes only, so no BLMOVE is in flight."""
        known = Counter(self._held.values())
        for raw in await self.link.call(queue.held, "reconcile"):
            if known[raw] > 0:
                known[raw] -= 1
                continue
            logger.warning("running a command found in our processing list without a task")
            self._spawn(executor, raw)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._held.pop(task, None)
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, RedisUnavailable):
                self._begin_stop(Exit.REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
            else:
                logger.opt(exception=exc).error("command task crashed")

    # --- background -----------------------------------------------------------------------------
    async def _heartbeat(self, queue: WorkQueue, sessions: SessionLeases) -> None:
        s = self.settings
        interval = s.worker_lease_seconds / 3
        info = {"host": socket.gethostname(), "pid": os.getpid(), "session": self.session_name}
        while not self.halt.is_set() and not self.force.is_set():
            try:
                try:
                    got = await queue.claim_lease(info)
                except REDIS_DOWN:  # one stale pooled connection after a restart: once more
                    got = await queue.claim_lease(info)
                if got == 0:
                    logger.error("worker lease {} is held by another process", self.worker_id)
                    self._begin_stop(Exit.FAILED, "worker lease taken over")
                elif got == 2:
                    logger.warning("worker lease had expired (redis outage?); re-claimed it")
                    for running in list(self._running.values()):
                        if not await queue.holds(running.entry):
                            running.taken_over = True
                            running.stop.set()
                if not await sessions.refresh():
                    logger.error("session {} is now held by another process", self.session_name)
                    self._begin_stop(Exit.FAILED, "session lease taken over")
                self.metrics.command_queue_length.set(await self._redis.llen(self.keys.commands))
                self.link.mark_up()
            except REDIS_DOWN as exc:
                self.link.mark_down(exc)
                if self.link.exhausted() and not self.stop.is_set():
                    self._begin_stop(
                        Exit.REDIS_UNAVAILABLE,
                        f"redis unavailable: unreachable for {self.link.outage_seconds():.0f}s",
                    )
            self._write_health()
            self._refresh_lag()
            await self._sleep(interval, until=self.halt)

    def _refresh_lag(self) -> None:
        """``fetch_lag_seconds`` grows while nothing is fetched: recompute it every heartbeat."""
        now = self.clock.now().timestamp()
        for label, fresh in list(self.tally.fresh_until.items()):
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
            served=self.tally.served,
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
        began = self.clock.monotonic()
        # The hard-stop guard is armed first: whatever below waits on Redis or on a task gives
        # up at the hard end of the grace period (force aborts RedisLink calls and the waits).
        hard_end = began + max(0.2, s.shutdown_grace_seconds - 1.0)
        loop = asyncio.get_running_loop()
        guard = loop.call_later(max(0.1, hard_end - self.clock.monotonic()), self._hard_stop)
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
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    break
                _done, pending = await asyncio.wait(pending, timeout=min(left, 0.2))
            if pending:
                logger.warning("cancelling {} commands (grace over or forced)", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=self._left(hard_end, 5.0))
        self.halt.set()
        for task in background:
            task.cancel()
        if background:
            _done, stuck = await asyncio.wait(background, timeout=self._left(hard_end, 2.0))
            if stuck:
                logger.warning("background tasks still running: {}", [t.get_name() for t in stuck])
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
                if self.exit_code == Exit.SESSION_REVOKED:
                    await self.link.call(
                        lambda: sessions.mark_bad(self.exit_reason, self.worker_id), "mark bad"
                    )
                await self.link.call(sessions.release, "release session")
        finally:
            guard.cancel()
            end = began + s.shutdown_grace_seconds
            if self.telegram is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.telegram.close(), timeout=self._left(end, 3.0))
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.aclose(), timeout=self._left(end, 1.0))
            self.health.remove()
            waited = self.clock.monotonic() - began
            last = self.tally.last_command or {}
            logger.info(
                "worker {} stopped ({}), exit {}, {} commands served, {:.1f}s to stop, "
                "last command {}",
                self.worker_id,
                self.exit_reason,
                self.exit_code,
                self.tally.served,
                waited,
                last.get("command_id", "none"),
                event="shutdown_completed",
                reason=self.exit_reason,
                exit_code=self.exit_code,
                waited_seconds=round(waited, 3),
                duration_ms=int(waited * 1000),
                commands_served=self.tally.served,
                last_command_id=last.get("command_id"),
                last_command_chat=last.get("chat"),
                last_command_status=last.get("status"),
            )
            await self._stop_exporters(began)

    async def _stop_exporters(self, began: float) -> None:
        """The last stage: final push and delete of our Pushgateway group, stop serving, then
        flush the log shipper (so what the exporters said on the way out is shipped too)."""
        left = self.settings.shutdown_grace_seconds - (self.clock.monotonic() - began)
        if self.exporters is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.exporters.stop, max(1.0, min(5.0, left - 0.5)))
        if self._shipper is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._shipper.close, max(0.5, min(5.0, left - 1.0)))

    def _hard_stop(self) -> None:
        """The grace period is (nearly) over: every wait and Redis call gives up now."""
        self.force.set()
        self.halt.set()

    def _left(self, until: float, cap: float) -> float:
        """A bounded wait: at most ``cap``, never past ``until`` (but a little, to finish)."""
        return max(0.1, min(cap, until - self.clock.monotonic()))

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


def _probe_storage(data_dir: Any, worker_id: str) -> str | None:
    """Write, fsync and delete a small file in ``data_dir``; ``None`` if that worked."""
    path = Path(data_dir) / f".probe-{worker_id}"
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"probe\n" * 512)
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        return f"{type(exc).__name__}: {exc}"
    return None


def run(settings: WorkerSettings) -> int:
    """Run the daemon until stopped; the process's exit code.

    Not ``asyncio.run``: that waits without a bound for every task left over to honour its
    cancellation, and one that lost it (see :attr:`Daemon.halt`) would keep the process alive.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(Daemon(settings).run())
    finally:
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            with contextlib.suppress(TimeoutError):
                loop.run_until_complete(
                    asyncio.wait_for(loop.shutdown_default_executor(), timeout=2.0)
                )
        finally:
            asyncio.set_event_loop(None)
            loop.close()


__all__ = ["Daemon", "run"]
