"""The leader's recovery loop: find dead workers, requeue their commands, forget their groups.

A worker is dead when its lease (``worker:<id>:lease``) has expired. Each tick the leader reads
every registered worker's lease TTL, runs :func:`fleet.recovery.recover` (requeue, or dead-letter
a command that keeps killing its workers), and deletes the Pushgateway groups of workers that
are gone, so no stale series outlives its worker. The earliest live lease's expiry is kept, so
the daemon can tick just then instead of up to a tick later.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from fleet.events import EventPublisher, poison_event
from fleet.keys import Keys
from fleet.metrics import WORKER_JOB
from fleet.push import delete_group, reap_dead_groups
from fleet.recovery import recover
from fleet.scripts import text
from governor.settings import GovernorSettings

if TYPE_CHECKING:
    pass


class DeadWorkers:
    """Recovery state carried from tick to tick (``metrics`` is set once the daemon has it)."""

    def __init__(self, settings: GovernorSettings, keys: Keys, governor_id: str, log: Any) -> None:
        self.settings = settings
        self.keys = keys
        self.governor_id = governor_id
        self.metrics: Any = None
        self._log = log
        self.back_at = -math.inf  # when Redis came back after an outage (monotonic)
        self.next_lease_expiry = math.inf  # monotonic time the earliest worker lease ends
        self._last_reap = -math.inf
        self._registered_before: list[str] = []

    async def sweep(self, client: Redis) -> None:
        """Requeue the commands of dead workers; forget their Pushgateway groups."""
        s = self.settings
        if time.monotonic() - self.back_at < s.worker_lease_seconds:
            # Every worker lease may have expired during the outage: give the live workers one
            # lease period to heart-beat again before treating them as dead.
            return
        registered = sorted(text(w) for w in await client.hkeys(self.keys.workers))
        dead = await self._dead(client, registered)
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

    async def _dead(self, client: Redis, registered: list[str]) -> list[str]:
        """The registered workers whose lease expired; notes when the next live one ends."""
        if not registered:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for wid in registered:
                pipe.pttl(self.keys.worker_lease(wid))
            ttls_ms = await pipe.execute()
        # PTTL is -2 for a missing key (the lease expired); a live lease has a TTL, and the
        # earliest one is when the next worker could be found dead: wake up for it then.
        alive = [int(ttl) != -2 for ttl in ttls_ms]
        live_ttls = [int(ttl) for ttl in ttls_ms if int(ttl) >= 0]
        self.next_lease_expiry = time.monotonic() + min(live_ttls) / 1000 if live_ttls else math.inf
        dead = [w for w, a in zip(registered, alive, strict=True) if not a]
        self._set_gauge("live_workers", len(registered) - len(dead))
        return dead

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

    def _set_gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()
