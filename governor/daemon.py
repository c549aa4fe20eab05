"""``python -m governor run``: the fleet's one leading governor.

Lifecycle::

    connect Redis ──► hold the leader lease? ──no──► stand by (retry every lease/3)
                          │ yes
                          ▼
        every GOVERNOR_TICK_SECONDS, and at once when a FloodWait is recorded:
          renew the lease (compare-and-extend) ──► rates (governor/controller.py): read
          counters, policy.decide per class and per flooded session, set_rate, log each
          change once (counters are also sampled every 0.25 s between ticks) ──► recover the
          commands of dead workers (governor/deadworkers.py), forget their Pushgateway groups
          ──► push the scheduled daily fetches that are due, or (FEATURE_INCREMENTAL_PARSING_
          ENABLED) one incremental-scheduler step (governor/incremental.py)
    SIGTERM/SIGINT ──► finish the tick ──► release the lease (a standby takes over at once)
        ──► close Redis ──► exit 0, within SHUTDOWN_GRACE_SECONDS

Only one governor leads: ``governor:leader`` holds the leader's token with a PX TTL of
``GOVERNOR_LEASE_SECONDS``; ``fleet/lua/lease.lua`` (the script of the worker and session
leases too) takes it with NX and extends it only if the token is still ours, so a governor
that stalled past its TTL steps down instead of fighting the new leader (governor/leader.py).
Rates live in Redis, so workers keep the last rates while no governor runs.

Why the leader also wakes on floods: the cut is what protects the rest of the fleet, and the
workers' requests already in flight at the old rate keep flooding until it lands; waiting for
the next tick would cost up to a whole tick of them. ``XREAD BLOCK`` on the flood stream (a
read, never a destructive pop) bounds every wait, so the stop Event is checked at least once
per tick.

Exit codes: 0 stopped by a signal; 69 Redis unreachable for longer than
``REDIS_MAX_OUTAGE_SECONDS``; 78 configuration error (from :mod:`governor.cli`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.bucket import TokenBucket
from fleet.clock import utc_iso
from fleet.exitcodes import Exit
from fleet.exporters import health_details, start_exporters
from fleet.keys import Keys
from fleet.metrics import GOVERNOR_JOB, package_version
from fleet.redisconn import REDIS_DOWN, RedisLink, connect
from fleet.scripts import text
from governor.controller import RateController
from governor.deadworkers import DeadWorkers
from governor.gauges import GaugeSampler
from governor.leader import LeaderLease
from governor.measure import COUNTER_SAMPLE_S
from governor.metrics import GovernorMetrics
from governor.scheduler import Schedule, Scheduler, parse_chats, parse_daily_at
from governor.settings import GovernorSettings

LEASE_EXPIRY_SLACK_S = 0.005  # wake just after a lease's expiry, when Redis has dropped it
# --- the daemon -------------------------------------------------------------------------------


class Governor:
    """The governor process's lifecycle. :meth:`run` returns the exit code."""

    def __init__(self, settings: GovernorSettings, *, install_signals: bool = True) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)
        self.governor_id = settings.resolved_governor_id()
        self.install_signals = install_signals
        self.stop = asyncio.Event()
        self.exit_code: int = Exit.OK
        self.leading = False
        self.redis: Redis | None = None
        self.metrics: Any = None
        self._exporters: Any = None
        self._log = logger.bind(governor_id=self.governor_id)
        self._dead = DeadWorkers(settings, self.keys, self.governor_id, self._log)
        self._gauges: GaugeSampler | None = None  # built once Redis is connected
        self.link = RedisLink(
            settings.redis_display(),
            max_outage_s=settings.redis_max_outage_seconds,
            abort=self.stop,
            on_state=self._on_redis_state,
        )
        self._last_tick_at: str | None = None
        self._flood_id = "0-0"
        self._incremental: Any = None  # governor.incremental.IncrementalScheduler when enabled
        self._seeded = False

    # --- entry point --------------------------------------------------------------------
    async def run(self) -> int:
        """Start, then lead or stand by until a signal or a long Redis outage; shut down."""
        s = self.settings
        self._check_channels_file()
        if self.install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self._start_metrics()
        tick = s.governor_tick_seconds
        # XREAD BLOCK on the flood stream waits up to a tick; a connect must not outlast a lease.
        self.redis = connect(
            s.redis_dsn(), pop_timeout_s=tick, connect_timeout_s=s.governor_lease_seconds
        )
        self._gauges = GaugeSampler(self.metrics, self.redis, self.keys, s)
        bucket = TokenBucket(self.redis, self.keys, s, worker_id=self.governor_id)
        lease = LeaderLease(self.redis, self.keys, self.governor_id, s.governor_lease_seconds)
        controller = RateController(bucket, s)
        schedule, scheduler = self._schedulers(self.redis)
        self._log.info(
            "governor {} starting: redis {}, tick {:g}s, lease {:g}s, schedule {}",
            self.governor_id,
            s.redis_display(),
            tick,
            s.governor_lease_seconds,
            f"{','.join(schedule.chats)} at {s.schedule_daily_at} {s.day_timezone}"
            if schedule.enabled
            else "off",
        )
        try:
            await self._loop(lease, bucket, controller, scheduler)
        finally:
            await self._shutdown(lease)
        return self.exit_code

    def _check_channels_file(self) -> None:
        s = self.settings
        if s.feature_incremental_parsing_enabled and s.parser_channels_file is not None:
            # A typo in channels.yaml is a configuration error (exit 78), found before leading.
            from fleet.settings import ConfigError
            from governor.channels import load_channels_yaml

            try:
                load_channels_yaml(s.parser_channels_file)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _schedulers(self, redis: Redis) -> tuple[Schedule, Scheduler | None]:
        """The daily schedule, and its scheduler unless the incremental one replaces it."""
        s = self.settings
        schedule = Schedule(
            parse_chats(s.schedule_chats), parse_daily_at(s.schedule_daily_at), s.tz
        )
        scheduler = Scheduler(redis, self.keys, schedule) if schedule.enabled else None
        if s.feature_incremental_parsing_enabled:
            # The incremental scheduler replaces the daily one; SCHEDULE_CHATS names channels.
            from governor.incremental import IncrementalScheduler

            self._incremental = IncrementalScheduler(redis, self.keys, s)
            scheduler = None
        return schedule, scheduler

    async def _loop(
        self,
        lease: LeaderLease,
        bucket: TokenBucket,
        controller: RateController,
        scheduler: Scheduler | None,
    ) -> None:
        """Step until stopped; a Redis outage past REDIS_MAX_OUTAGE_SECONDS ends the loop."""
        s = self.settings
        failures = 0
        while not self.stop.is_set():
            try:
                await self._step(lease, bucket, controller, scheduler)
                failures = 0
                self.link.mark_up()
            except REDIS_DOWN as exc:
                failures += 1
                if failures == 1 and self.link.up:
                    # After a Redis restart every pooled connection fails once (the client
                    # retries nothing itself): try again at once before calling it an outage.
                    continue
                if self._redis_down(exc):
                    break
                await self._sleep(min(s.governor_tick_seconds, s.governor_lease_seconds / 3))

    async def _step(
        self,
        lease: LeaderLease,
        bucket: TokenBucket,
        controller: RateController,
        scheduler: Scheduler | None,
    ) -> None:
        s = self.settings
        poll = min(s.governor_tick_seconds, s.governor_lease_seconds / 3)
        holds = await lease.hold()
        self.link.mark_up()  # Redis answered: an outage is over even if the tick fails later
        if holds and not self.leading:
            self.leading = True
            controller.reset()
            await bucket.publish_configured()
            newest = await bucket.redis.xrevrange(self.keys.floods, count=1)
            self._flood_id = text(newest[0][0]) if newest else "0-0"
            self._log.warning("governor {} leads now", self.governor_id)
            self._set_gauge("governor_leader", 1)
        elif not holds and self.leading:
            self.leading = False
            controller.reset()
            self._log.warning("governor {} lost the leader lease; standing by", self.governor_id)
            self._set_gauge("governor_leader", 0)
        if not self.leading:
            await self._sleep(poll)
            return
        tick_started = time.monotonic()
        for change in await controller.tick():
            log = self._log.warning if change.decision.action == "cut" else self._log.info
            log(change.line())
            if change.scope == "fleet" and self.metrics is not None:
                self.metrics.bucket_rate_per_second.labels(request_class=change.request_class).set(
                    change.new
                )
        assert self.redis is not None and self._gauges is not None
        await self._dead.sweep(self.redis)
        await self._gauges.bucket(bucket)
        self._last_tick_at = utc_iso(datetime.now(UTC))
        if scheduler is not None:
            for cmd in await scheduler.run_once(datetime.now(UTC)):
                self._log.info("scheduled fetch of {} pushed ({})", cmd["chat"], cmd["command_id"])
        if self._incremental is not None:
            await self._schedule_incremental()
        await self._gauges.splits()
        remaining = poll - (time.monotonic() - tick_started)
        # A worker that died shows when its lease expires: tick then rather than up to a tick
        # later, so its commands and its Pushgateway group go without delay.
        until_expiry = self._dead.next_lease_expiry - time.monotonic() + LEASE_EXPIRY_SLACK_S
        remaining = min(remaining, max(0.0, until_expiry))
        wake_at = time.monotonic() + remaining
        while remaining > 0 and not self.stop.is_set():
            if await self._wait_floods(bucket.redis, min(remaining, COUNTER_SAMPLE_S)):
                break
            await controller.sample()
            remaining = wake_at - time.monotonic()

    async def _schedule_incremental(self) -> None:
        """One evaluation of the incremental scheduler (governor/incremental.py)."""
        inc = self._incremental
        if not self._seeded:
            for ch in await inc.seed():
                self._log.info("channel {} added from SCHEDULE_CHATS/channels file", ch.chat)
            self._seeded = True
        result = await inc.tick()
        for key, outcome in result.finished:
            log = self._log.info if outcome == "ok" else self._log.warning
            log("scheduled run of {} ended: {}", key, outcome)
        for p in result.pushed:
            self._log.info(
                "scheduled {} fetch of {} pushed ({}, from {} after id {})",
                p.mode,
                p.channel.chat,
                p.command["command_id"],
                p.command["from"],
                p.command["after_id"],
            )
        if self.metrics is not None and result.ran:
            self.metrics.scheduler_ticks_total.inc()
            for p in result.pushed:
                self.metrics.scheduler_commands_total.labels(mode=p.mode).inc()
            self.metrics.scheduler_in_flight.set(result.in_flight)
        if self._gauges is not None:
            await self._gauges.channels()

    async def _wait_floods(self, client: Redis, seconds: float) -> bool:
        """Block until ``seconds`` passed or a FloodWait is recorded (True: tick at once)."""
        reply: Any = await client.xread(
            {self.keys.floods: self._flood_id}, block=max(1, int(seconds * 1000)), count=100
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._flood_id = text(entry_id)
                if self.metrics is not None:
                    f = {text(k): text(v) for k, v in fields.items()}
                    with contextlib.suppress(ValueError):
                        self.metrics.count_flood_wait(
                            f.get("session", ""), f.get("class", "other"), float(f["seconds"])
                        )
        return bool(reply)

    # --- signals, outages, shutdown -----------------------------------------------------
    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            self._log.info("{} received: stopping", sig.name)
        self.stop.set()

    def _redis_down(self, exc: BaseException) -> bool:
        """Report to the outage tracker; True when the outage outlasted
        REDIS_MAX_OUTAGE_SECONDS (exit 69)."""
        self.link.mark_down(exc)
        if self.leading:
            # Our lease may expire meanwhile; a new term starts from a fresh reading.
            self.leading = False
            self._set_gauge("governor_leader", 0)
        if self.link.exhausted():
            self._log.error(
                "redis unavailable for {:.0f}s; exiting", self.settings.redis_max_outage_seconds
            )
            self.exit_code = Exit.REDIS_UNAVAILABLE
            return True
        return False

    def _on_redis_state(self, up: bool) -> None:
        if up:
            self._dead.back_at = time.monotonic()

    async def _shutdown(self, lease: LeaderLease) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self.redis is not None:
            if self.leading:
                with contextlib.suppress(*REDIS_DOWN, OSError):
                    async with asyncio.timeout(min(2.0, grace / 4)):
                        await lease.release()
                self.leading = False
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        if self._exporters is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._exporters.stop, min(5.0, grace / 4))
        self._log.info("governor {} stopped", self.governor_id)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))

    # --- metrics ------------------------------------------------------------------------
    def _start_metrics(self) -> None:
        s = self.settings
        self.metrics = GovernorMetrics(
            session_label_max=s.metrics_session_label_max,
            chat_label_max=s.metrics_chat_label_max,
        )
        self._dead.metrics = self.metrics
        # The command line set logging up before the metrics existed: count its shipper's drops
        # (log_records_dropped_total{sink} at 0 for each configured log server, issue 12).
        from fleet.logs import active_shipper

        self.metrics.watch_log_shipper(active_shipper())
        if s.effective_metrics_mode == "off":
            return
        self._exporters = start_exporters(
            s,
            self.metrics.registry,
            job=GOVERNOR_JOB,
            instance=self.governor_id,
            health=self._healthy,
            details=self._details,
        )

    def _healthy(self) -> bool:
        """``/health``: 200 while running with Redis reachable (leading or standing by)."""
        return self.redis is not None and self.link.up and not self.stop.is_set()

    def _details(self) -> dict[str, object]:
        return health_details(
            version=package_version(),
            redis_ok=self.redis is not None and self.link.up,
            governor_id=self.governor_id,
            leading=self.leading,
            last_tick=self._last_tick_at,
        )

    def _set_gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)


def run(settings: GovernorSettings) -> int:
    return asyncio.run(Governor(settings).run())
