"""``python -m worker`` (``run``): the long-running worker, driven by Redis.

Lifecycle (:meth:`Daemon.run`; each stage in its own module)::

    connect Redis ──► claim a session lease ──► recover dead workers, claim the worker lease
        ──► connect Telegram (worker.startup) ──► take commands (worker.intake: BLMOVE, up to
        PARALLELISM_MAX at once, one per chat) ◄─┐   heartbeat (lease, session lease, health
                                                 │   file) every WORKER_LEASE_SECONDS/3
                └── recovery (dead workers, due retries) every RECOVERY_INTERVAL_SECONDS
                    (worker.heartbeat)
    SIGTERM/SIGINT ──► stop taking ──► fetches stop after the current page (progress saved)
        ──► commands not finished go back to the head of tg_commands ──► release the session
        ──► close Telegram and Redis ──► exit 0, within SHUTDOWN_GRACE_SECONDS
        (worker.shutdown)

Each command taken runs in its own task, executed by :class:`worker.executor.CommandExecutor`
(validation, events, retries, ack). A ``SessionRevoked`` there puts the command back (no event);
the daemon then marks the session bad and exits 77. What the worker reports about itself (health
file, ``/health``, ``/health/details``) is :mod:`worker.status`'s.

Exit codes (:class:`fleet.exitcodes.Exit`): 0 stopped by a signal; 1 the worker lease or the
session lease was taken over by another process; 69 Redis unreachable for longer than
``REDIS_MAX_OUTAGE_SECONDS``; 77 session revoked (do not restart); 78 configuration error.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.clock import Clock, SystemClock
from fleet.events import EventPublisher
from fleet.exitcodes import Exit
from fleet.exporters import Exporters, start_exporters
from fleet.keys import Keys
from fleet.metrics import WORKER_JOB, package_version
from fleet.redisconn import RedisLink, RedisUnavailable, connect
from fleet.settings import ConfigError
from worker import heartbeat, intake, shutdown, startup, status
from worker.backend import backend_for
from worker.errors import SessionRevoked
from worker.executor import CommandExecutor
from worker.health import HealthFile
from worker.metrics import WorkerMetrics
from worker.queue import WorkQueue
from worker.running import Running, Tally
from worker.sessions import SessionLeases
from worker.settings import WorkerSettings

VERSION = package_version()


class Daemon:
    """The worker process's lifecycle and its shared state. :meth:`run` returns the exit code.

    The stage modules (startup, heartbeat, intake, shutdown, status) read and write this
    state; the daemon owns the stop rules (signals, :meth:`begin_stop`, :meth:`hard_stop`)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        install_signals: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()  # every time the worker's stages read
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
        self.running: dict[str, Running] = {}  # by command_id
        self.tasks: set[asyncio.Task[None]] = set()
        self.held: dict[asyncio.Task[None], bytes] = {}  # task -> its processing-list entry
        self.slot_freed = asyncio.Event()
        self.status = "starting"
        self.tally = Tally()  # written by the executor, reported here
        self.client: Redis | None = None
        self.link = RedisLink(
            settings.redis_display(),
            max_outage_s=settings.redis_max_outage_seconds,
            abort=self.force,
            max_wait_s=min(5.0, settings.backoff_max_seconds),
        )
        self.health = HealthFile(settings.health_file)
        self.backend: Any = None
        self.telegram: Any = None
        self.store: Any = None
        # Observability: one registry per process, passed down to the gate, the Telegram
        # boundary, the fetcher and the event publisher; served/pushed by self.exporters.
        self.metrics = WorkerMetrics(
            version=VERSION, chat_label_max=settings.metrics_chat_label_max
        )
        self.metrics.set_breaker_state(status.BREAKER, "closed")
        self.exporters: Exporters | None = None
        self.shipper: Any = None

    # --- the lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        self._install_signal_handlers()
        self._setup_logging()
        if s.metrics_mode in ("push", "both") and not s.pushgateway_url:
            # Before anything else: a configuration error must not wait for a session first.
            raise ConfigError(f"PUSHGATEWAY_URL: required when METRICS_MODE={s.metrics_mode}")
        self.client = connect(s.redis_dsn(), pop_timeout_s=s.command_pop_timeout_seconds)
        status.write_health(self, "starting")
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
            if not await self._claim_session(sessions):
                return self.exit_code
            queue = self._queue()
            publisher = self._publisher()
            if not await startup.claim_worker_lease(self, queue, publisher):
                return self.exit_code
            background = heartbeat.start(self, queue, sessions, publisher)
            if not await startup.connect_telegram(self, sessions):
                return self.exit_code
            self.status = "idle"
            logger.info(
                "worker {} ready on session {} (parallelism {})",
                self.worker_id,
                self.session_name,
                s.parallelism_max,
            )
            await intake.take_loop(self, queue, self._executor(queue, publisher))
        except RedisUnavailable as exc:
            self.begin_stop(Exit.REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
        except SessionRevoked as exc:
            self.begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")
        finally:
            await shutdown.shut_down(self, queue, sessions, background)
        return self.exit_code

    async def _claim_session(self, sessions: SessionLeases) -> bool:
        """Wait for a free session (``False``: stopped first); then the worker is named."""
        status.write_health(self, "waiting_session")
        # Refreshed every round of the wait, so that Docker's health check (file age) does
        # not take a worker waiting for a free session for a dead one.
        self.session_name = await sessions.claim(
            self.stop, on_wait=lambda: status.write_health(self, "waiting_session")
        )
        if self.session_name is None:
            return False
        self.worker_id = self.settings.resolved_worker_id(self.session_name)
        self._setup_logging()  # again: now with the worker id
        self._start_exporters()  # the Pushgateway group is named after the worker id
        return True

    def _queue(self) -> WorkQueue:
        s = self.settings
        return WorkQueue(
            self.redis,
            self.keys,
            self.worker_id,
            lease_s=s.worker_lease_seconds,
            completed_ttl_s=s.completed_ids_ttl_seconds,
            dead_letters_max=s.dead_letters_max,
            dead_letter_payload_max_bytes=s.dead_letter_payload_max_bytes,
            events_maxlen=s.events_stream_maxlen,
            clock=self.clock,
        )

    def _publisher(self) -> EventPublisher:
        s = self.settings
        return EventPublisher(
            self.redis,
            self.keys,
            stream_maxlen=s.events_stream_maxlen,
            max_elapsed_s=s.event_publish_max_seconds,
            on_retry=self._record_retry,
        )

    def _executor(self, queue: WorkQueue, publisher: EventPublisher) -> CommandExecutor:
        return CommandExecutor(
            self.settings,
            worker_id=self.worker_id,
            queue=queue,
            publisher=publisher,
            link=self.link,
            telegram=self.telegram,
            store=self.store,
            metrics=self.metrics,
            tally=self.tally,
            running=self.running,
            held=self.held,
            stop=self.stop,
            slot_freed=self.slot_freed,
            on_busy=self._on_busy,
            on_revoked=self._on_revoked,
            clock=self.clock,
        )

    # --- signals and stopping -----------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if self.install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = self.clock.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            logger.info(
                "{} received: stopping (grace {:.0f}s); a second signal stops faster",
                sig.name,
                self.settings.shutdown_grace_seconds,
            )
            self.begin_stop(Exit.OK, sig.name)
            # Armed at the signal, not when the shutdown sequence starts: a worker still
            # starting (Redis unreachable, waiting for a lease) must stop within the grace too.
            grace = self.settings.shutdown_grace_seconds
            asyncio.get_running_loop().call_later(max(0.2, grace - 1.0), self.hard_stop)
        elif now - self._first_signal_at < 1.0:
            # rq's lesson: process managers and terminals often deliver the same stop twice.
            return
        elif not self.force.is_set():
            logger.warning("second {}: stopping now (files stay valid)", sig.name)
            self.force.set()
            for task in list(self.tasks):
                task.cancel()

    def begin_stop(self, code: int, reason: str) -> None:
        """Stop taking; the first reason and exit code win; every running fetch stops after
        its current page."""
        if not self.stop.is_set():
            self.exit_code = code
            self.exit_reason = reason
            self.stop.set()
        for running in self.running.values():
            running.stop.set()

    def hard_stop(self) -> None:
        """The grace period is (nearly) over: every wait and Redis call gives up now."""
        self.force.set()
        self.halt.set()

    def _on_revoked(self, exc: SessionRevoked) -> None:
        """A command's fetch found the session revoked."""
        self.begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")

    def _on_busy(self) -> None:
        """A command's fetch starts. A storage pause stays reported: a command that was
        already waiting for its chat may still start while the worker takes nothing new."""
        if self.status != "storage_error":
            self.status = "busy"

    # --- observability ------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        from fleet.logs import setup_logging

        self.shipper = setup_logging(self.settings, worker_id=self.worker_id, component="worker")
        self.metrics.watch_log_shipper(self.shipper)

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
            health=lambda: status.healthy(self),
            details=lambda: status.details(self, VERSION),
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

    # --- helpers for the stages ---------------------------------------------------------------
    @property
    def redis(self) -> Redis:
        assert self.client is not None
        return self.client

    async def sleep(self, seconds: float, *, until: asyncio.Event | None = None) -> None:
        """Sleep on the stop flag (or ``until``): a stop ends the sleep at once."""
        await self.wait_any(until or self.stop, seconds)

    @staticmethod
    async def wait_any(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)


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
