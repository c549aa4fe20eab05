"""``python -m governor run``: the fleet's one leading governor.

Lifecycle::

    connect Redis ──► hold the leader lease? ──no──► stand by (retry every lease/3)
                          │ yes
                          ▼
        every GOVERNOR_TICK_SECONDS, and at once when a FloodWait is recorded:
          renew the lease (compare-and-extend) ──► rates (governor/controller.py): read
          counters, policy.decide per class and per flooded session, set_rate, log each
          change once (counters are also sampled every 0.25 s between ticks) ──► recover the
          commands of dead workers (fleet.recovery.recover), forget their Pushgateway groups
          ──► push the scheduled daily fetches that are due, or (FEATURE_INCREMENTAL_PARSING_
          ENABLED) one incremental-scheduler step (governor/incremental.py)
    SIGTERM/SIGINT ──► finish the tick ──► release the lease (a standby takes over at once)
        ──► close Redis ──► exit 0, within SHUTDOWN_GRACE_SECONDS

Only one governor leads: ``governor:leader`` holds the leader's token with a PX TTL of
``GOVERNOR_LEASE_SECONDS``; ``fleet/lua/lease.lua`` (the script of the worker and session
leases too) takes it with NX and extends it only if the token is still ours, so a governor
that stalled past its TTL steps down instead of fighting the new leader. Rates live in Redis,
so workers keep the last rates while no governor runs.

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
import math
import signal
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.bucket import TokenBucket
from fleet.clock import utc_iso
from fleet.events import EventPublisher, poison_event
from fleet.exitcodes import Exit
from fleet.gate import REQUEST_CLASSES
from fleet.keys import Keys
from fleet.metrics import GOVERNOR_JOB, WORKER_JOB, health_details, package_version, start_exporters
from fleet.push import delete_group, reap_dead_groups
from fleet.recovery import recover
from fleet.redisconn import REDIS_DOWN, RedisLink, connect
from fleet.scripts import scripts_for, text
from governor.controller import COUNTER_SAMPLE_S, RateController
from governor.metrics import GovernorMetrics
from governor.scheduler import Schedule, Scheduler, parse_chats, parse_daily_at
from governor.settings import GovernorSettings

GAUGE_SAMPLE_S = 5.0  # how often the leader samples bucket tokens and pauses for its gauges
LEASE_EXPIRY_SLACK_S = 0.005  # wake just after a lease's expiry, when Redis has dropped it
# --- the leader lease -------------------------------------------------------------------------


class LeaderLease:
    """``governor:leader``: take (NX), extend if ours (compare-and-extend), release if ours."""

    def __init__(self, redis: Redis, keys: Keys, owner: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = keys.governor_leader
        self.token = f"{owner}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._scripts = scripts_for(redis)

    async def hold(self) -> bool:
        """True if we lead after this call (taken now or extended)."""
        lease = self._scripts.lease
        return int(await lease(keys=[self.key], args=[self.token, self.ttl_ms])) > 0

    async def release(self) -> bool:
        return int(await self._scripts.unlease(keys=[self.key], args=[self.token])) > 0

    async def holder(self) -> str | None:
        raw = await self.redis.get(self.key)
        return text(raw) if raw is not None else None


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
        self.link = RedisLink(
            settings.redis_display(),
            max_outage_s=settings.redis_max_outage_seconds,
            abort=self.stop,
            on_state=self._on_redis_state,
        )
        self._back_at = -math.inf  # when Redis came back after an outage (monotonic)
        self._last_sample = -math.inf
        self._next_lease_expiry = math.inf  # monotonic time the earliest worker lease ends
        self._last_tick_at: str | None = None
        self._flood_id = "0-0"
        self._last_reap = -math.inf
        self._registered_before: list[str] = []
        self._incremental: Any = None  # governor.incremental.IncrementalScheduler when enabled
        self._seeded = False
        self._last_sched_sample = -math.inf
        self._last_split_sample = -math.inf
        self._log = logger.bind(governor_id=self.governor_id)

    # --- entry point --------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        if s.feature_incremental_parsing_enabled and s.parser_channels_file is not None:
            # A typo in channels.yaml is a configuration error (exit 78), found before leading.
            from fleet.settings import ConfigError
            from governor.channels import load_channels_yaml

            try:
                load_channels_yaml(s.parser_channels_file)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
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
        bucket = TokenBucket(self.redis, self.keys, s, worker_id=self.governor_id)
        lease = LeaderLease(self.redis, self.keys, self.governor_id, s.governor_lease_seconds)
        controller = RateController(bucket, s)
        schedule = Schedule(
            parse_chats(s.schedule_chats), parse_daily_at(s.schedule_daily_at), s.tz
        )
        scheduler = Scheduler(self.redis, self.keys, schedule) if schedule.enabled else None
        if s.feature_incremental_parsing_enabled:
            # The incremental scheduler replaces the daily one; SCHEDULE_CHATS names channels.
            from governor.incremental import IncrementalScheduler

            self._incremental = IncrementalScheduler(self.redis, self.keys, s)
            scheduler = None
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
        failures = 0
        try:
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
                    await self._sleep(min(tick, s.governor_lease_seconds / 3))
        finally:
            await self._shutdown(lease)
        return self.exit_code

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
        await self._recover()
        await self._sample_bucket(bucket)
        self._last_tick_at = utc_iso(datetime.now(UTC))
        if scheduler is not None:
            for cmd in await scheduler.run_once(datetime.now(UTC)):
                self._log.info("scheduled fetch of {} pushed ({})", cmd["chat"], cmd["command_id"])
        if self._incremental is not None:
            await self._schedule_incremental()
        await self._sample_splits()
        remaining = poll - (time.monotonic() - tick_started)
        # A worker that died shows when its lease expires: tick then rather than up to a tick
        # later, so its commands and its Pushgateway group go without delay.
        until_expiry = self._next_lease_expiry - time.monotonic() + LEASE_EXPIRY_SLACK_S
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
        if (
            self.metrics is not None
            and time.monotonic() - self._last_sched_sample >= GAUGE_SAMPLE_S
        ):
            self._last_sched_sample = time.monotonic()
            await self._scheduler_gauges()

    async def _sample_splits(self) -> None:
        """``split_commands_in_flight`` and ``split_parts{state}``, at most every
        ``GAUGE_SAMPLE_S`` (worker/parts.py)."""
        if self.metrics is None or self.redis is None:
            return
        now = time.monotonic()
        if now - self._last_split_sample < GAUGE_SAMPLE_S:
            return
        self._last_split_sample = now
        from governor.incremental import split_counts

        parents, pending, running = await split_counts(self.redis, self.keys)
        self.metrics.split_commands_in_flight.set(parents)
        self.metrics.split_parts.labels(state="running").set(running)
        self.metrics.split_parts.labels(state="queued").set(max(0, pending - running))

    async def _scheduler_gauges(self) -> None:
        """Channels by mode and per-channel lag, at most every ``GAUGE_SAMPLE_S``."""
        from governor.incremental import channel_report

        m = self.metrics
        assert self.redis is not None
        report = await channel_report(self.redis, self.keys, self.settings)
        by_mode = {"historical": 0, "incremental": 0, "paused": 0}
        for r in report:
            by_mode[r["mode"]] = by_mode.get(r["mode"], 0) + 1
            if r["lag_s"] is not None:
                m.scheduler_channel_lag_seconds.labels(chat=m.chat_label(r["chat"])).set(r["lag_s"])
        for mode, n in by_mode.items():
            m.scheduler_channels.labels(mode=mode).set(n)

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

    # --- dead workers -------------------------------------------------------------------
    async def _recover(self) -> None:
        """Requeue the commands of dead workers; forget their Pushgateway groups."""
        client = self.redis
        assert client is not None
        s = self.settings
        if time.monotonic() - self._back_at < s.worker_lease_seconds:
            # Every worker lease may have expired during the outage: give the live workers one
            # lease period to heart-beat again before treating them as dead.
            return
        registered = sorted(text(w) for w in await client.hkeys(self.keys.workers))
        dead: list[str] = []
        if registered:
            async with client.pipeline(transaction=False) as pipe:
                for wid in registered:
                    pipe.pttl(self.keys.worker_lease(wid))
                ttls_ms = await pipe.execute()
            # PTTL is -2 for a missing key (the lease expired); a live lease has a TTL, and the
            # earliest one is when the next worker could be found dead: wake up for it then.
            alive = [int(ttl) != -2 for ttl in ttls_ms]
            live_ttls = [int(ttl) for ttl in ttls_ms if int(ttl) >= 0]
            self._next_lease_expiry = (
                time.monotonic() + min(live_ttls) / 1000 if live_ttls else math.inf
            )
            dead = [w for w, a in zip(registered, alive, strict=True) if not a]
            self._set_gauge("live_workers", len(registered) - len(dead))
        report = await recover(
            client,
            self.keys,
            max_deliveries=s.command_max_deliveries,
            dead_letters_max=s.dead_letters_max,
        )
        self._set_gauge("dead_letters", await client.llen(self.keys.dead_letters))
        for wid in dead:
            self._log.warning(
                "worker {} is dead (heartbeat expired); {} commands requeued",
                wid,
                report.recovered.get(wid, 0),
            )
        for wid, count in report.recovered.items():
            if wid not in dead:
                self._log.warning("recovered {} commands of dead worker {}", count, wid)
        if self.metrics is not None and report.total:
            self.metrics.commands_recovered_total.inc(report.total)
        if report.dead_lettered:
            publisher = EventPublisher(client, self.keys, stream_maxlen=s.events_stream_maxlen)
            for letter in report.dead_lettered:
                self._log.error("dead-lettered {}: {}", letter.command_id, letter.reason)
                await publisher.publish(poison_event(letter, self.governor_id))
        # Workers that left the registry since the last tick without being seen dead here (a
        # worker's own recovery got them first): their groups go now too, not at the next sweep.
        gone = [w for w in self._registered_before if w not in registered]
        self._registered_before = registered
        if s.pushgateway_url:
            await self._forget_groups(dead + gone, registered)

    async def _forget_groups(self, dead: list[str], registered: list[str]) -> None:
        s = self.settings
        for wid in dead:
            if await asyncio.to_thread(delete_group, s, WORKER_JOB, wid, timeout=2.0):
                self._count("pushgateway_groups_deleted_total")
        # Workers another process recovered first never show up as dead here: sweep now and
        # then for groups of workers that are not live.
        now = time.monotonic()
        if now - self._last_reap >= s.governor_pushgateway_reap_seconds:
            self._last_reap = now
            live = [w for w in registered if w not in dead]
            deleted = await asyncio.to_thread(
                reap_dead_groups,
                s,
                job=WORKER_JOB,
                live_instances=live,
                min_age_s=2 * s.push_interval_seconds,
            )
            for _ in deleted:
                self._count("pushgateway_groups_deleted_total")

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
            self._back_at = time.monotonic()

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

    async def _sample_bucket(self, bucket: TokenBucket) -> None:
        """``bucket_tokens`` and ``pauses_in_force`` from a bucket snapshot, at most every
        ``GAUGE_SAMPLE_S`` (the snapshot scans the bucket and pause keys)."""
        if self.metrics is None or time.monotonic() - self._last_sample < GAUGE_SAMPLE_S:
            return
        self._last_sample = time.monotonic()
        snap = await bucket.snapshot()
        for c in REQUEST_CLASSES:
            fleet = snap["rates"]["fleet"][c]
            tokens = snap["tokens"].get(f"fleet:{c}", float(fleet["burst"]))  # idle: full
            self.metrics.bucket_tokens.labels(request_class=c).set(tokens)
            self.metrics.bucket_rate_per_second.labels(request_class=c).set(fleet["per_second"])
            paused = sum(1 for name in snap["pauses_s"] if name.endswith(f":{c}"))
            self.metrics.pauses_in_force.labels(request_class=c).set(paused)

    def _set_gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()


def run(settings: GovernorSettings) -> int:
    return asyncio.run(Governor(settings).run())
