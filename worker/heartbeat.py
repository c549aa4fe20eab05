"""The worker's two background loops, from the worker lease to the shutdown.

- :func:`heartbeat`, every ``WORKER_LEASE_SECONDS``/3: renew the worker lease and the session
  lease (stop with exit 1 if another process took either), the queue-length gauge, the health
  file and the lag metric; track the Redis outage (exit 69 past ``REDIS_MAX_OUTAGE_SECONDS``).
- :func:`recovery`, every ``RECOVERY_INTERVAL_SECONDS`` (±20 %): hand back the commands of dead
  workers, promote due retries, dead-letter poison commands (with their ``failed`` event).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.events import EventPublisher, poison_event
from fleet.exitcodes import Exit
from fleet.recovery import recover
from fleet.redisconn import REDIS_DOWN
from worker.queue import WorkQueue
from worker.sessions import SessionLeases
from worker.status import write_health

if TYPE_CHECKING:
    from worker.daemon import Daemon


def start(
    d: Daemon, queue: WorkQueue, sessions: SessionLeases, publisher: EventPublisher
) -> list[asyncio.Task[None]]:
    """Both loops as tasks; the shutdown ends them (``Daemon.halt``, then cancellation)."""
    return [
        asyncio.create_task(heartbeat(d, queue, sessions), name="heartbeat"),
        asyncio.create_task(recovery(d, publisher), name="recovery"),
    ]


async def heartbeat(d: Daemon, queue: WorkQueue, sessions: SessionLeases) -> None:
    interval = d.settings.worker_lease_seconds / 3
    info = {"host": socket.gethostname(), "pid": os.getpid(), "session": d.session_name}
    while not d.halt.is_set() and not d.force.is_set():
        try:
            await _renew(d, queue, sessions, info)
            d.metrics.command_queue_length.set(await d.redis.llen(d.keys.commands))
            d.link.mark_up()
        except REDIS_DOWN as exc:
            d.link.mark_down(exc)
            if d.link.exhausted() and not d.stop.is_set():
                d.begin_stop(
                    Exit.REDIS_UNAVAILABLE,
                    f"redis unavailable: unreachable for {d.link.outage_seconds():.0f}s",
                )
        write_health(d)
        refresh_lag(d)
        await d.sleep(interval, until=d.halt)


async def _renew(
    d: Daemon, queue: WorkQueue, sessions: SessionLeases, info: dict[str, Any]
) -> None:
    """Renew both leases; stop if another process holds either."""
    try:
        got = await queue.claim_lease(info)
    except REDIS_DOWN:  # one stale pooled connection after a restart: once more
        got = await queue.claim_lease(info)
    if got == 0:
        logger.error("worker lease {} is held by another process", d.worker_id)
        d.begin_stop(Exit.FAILED, "worker lease taken over")
    elif got == 2:
        logger.warning("worker lease had expired (redis outage?); re-claimed it")
        # A recovery may have given our commands to another worker meanwhile: those that left
        # our processing list stop here without an event (their new worker reports them).
        for running in list(d.running.values()):
            if not await queue.holds(running.entry):
                running.taken_over = True
                running.stop.set()
    if not await sessions.refresh():
        logger.error("session {} is now held by another process", d.session_name)
        d.begin_stop(Exit.FAILED, "session lease taken over")


def refresh_lag(d: Daemon) -> None:
    """``fetch_lag_seconds`` grows while nothing is fetched: recompute it every heartbeat."""
    now = d.clock.now().timestamp()
    for label, fresh in list(d.tally.fresh_until.items()):
        d.metrics.fetch_lag_seconds.labels(chat=label).set(max(0.0, now - fresh))


async def recovery(d: Daemon, publisher: EventPublisher) -> None:
    s = d.settings
    while not d.stop.is_set():
        await d.sleep(s.recovery_interval_seconds * random.uniform(0.8, 1.2))
        if d.stop.is_set():
            break
        if not d.link.up or d.link.since_back() < s.worker_lease_seconds:
            # Every lease expired during the outage: give the live workers one lease period
            # to heart-beat again before treating them as dead.
            continue
        try:
            report = await recover(
                d.redis,
                d.keys,
                max_deliveries=s.command_max_deliveries,
                dead_letters_max=s.dead_letters_max,
            )
        except REDIS_DOWN:
            continue  # the heartbeat reports the outage
        await after_recovery(d, report, publisher)


async def after_recovery(d: Daemon, report: Any, publisher: EventPublisher) -> None:
    """Log what a recovery did; a ``failed`` event for each command it dead-lettered."""
    for wid, count in report.recovered.items():
        logger.warning("recovered {} commands of dead worker {}", count, wid)
    if report.promoted:
        logger.info("{} delayed retries back on the queue", report.promoted)
    for letter in report.dead_lettered:
        logger.bind(command_id=letter.command_id, chat=letter.chat).error(
            "dead-lettered: {}", letter.reason
        )
        await publisher.publish(poison_event(letter, d.worker_id))


__all__ = ["after_recovery", "heartbeat", "recovery", "refresh_lag", "start"]
