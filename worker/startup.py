"""The worker's way in, after its session lease: claim the worker lease, then connect Telegram.

Claiming the worker lease first recovers dead workers (our own previous run included, once its
lease expired), then waits while a live process holds a lease under our worker id, taking it
over at once when that holder is a dead process on this host. Connecting Telegram retries
transient failures with backoff; a revoked session marks the session bad and stops the worker
(exit 77).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.clock import SystemClock, utc_iso
from fleet.events import EventPublisher
from fleet.exitcodes import Exit
from fleet.recovery import recover
from fleet.redisconn import REDIS_DOWN
from worker.errors import FetchError, SessionRevoked
from worker.heartbeat import after_recovery
from worker.queue import WorkQueue
from worker.sessions import SessionLeases, take_over_dead_holder

if TYPE_CHECKING:
    from worker.daemon import Daemon


async def claim_worker_lease(d: Daemon, queue: WorkQueue, publisher: EventPublisher) -> bool:
    """Recover dead workers, then hold our lease (``False``: stopped while waiting for it).
    Waits while a process holds a lease under our worker id."""
    s = d.settings
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "session": d.session_name,
        "started": utc_iso(d.clock.now()),
    }
    warned = False
    scan = True
    while not d.stop.is_set():
        await _recover(d, publisher, scan=scan)
        scan = False
        got = await d.link.call(lambda: queue.claim_lease(info), "worker lease")
        if got in (1, 2):
            left = await d.link.call(queue.release_all, "release leftovers")
            if left > 0:
                logger.info("handed back {} commands left by a previous run", left)
            return True
        if await _took_over_dead_predecessor(d, queue):
            scan = True
            continue
        if not warned:
            warned = True
            logger.warning(
                "worker id {} is leased by another process (a previous run that died, or "
                "a duplicate WORKER_ID); waiting up to {:.0f}s for the lease to expire",
                d.worker_id,
                s.worker_lease_seconds,
            )
        await d.sleep(min(1.0, s.worker_lease_seconds / 3))
    return False


async def _recover(d: Daemon, publisher: EventPublisher, *, scan: bool) -> None:
    """One recovery through the outage tracker; ``scan`` also walks every worker's list."""
    s = d.settings
    report = await d.link.call(
        lambda: recover(
            d.redis,
            d.keys,
            max_deliveries=s.command_max_deliveries,
            dead_letters_max=s.dead_letters_max,
            scan=scan,
        ),
        "recovery",
    )
    await after_recovery(d, report, publisher)


async def _took_over_dead_predecessor(d: Daemon, queue: WorkQueue) -> bool:
    """Our predecessor under this WORKER_ID was killed: its lease is gone now, and the next
    recovery hands its commands back (counting the delivery) at once."""
    dead = await d.link.call(
        lambda: take_over_dead_holder(d.redis, queue.lease_key, queue.token),
        "dead predecessor",
    )
    if dead is None:
        return False
    logger.warning(
        "worker lease {} was held by a dead process ({}); taking it over",
        d.worker_id,
        dead.rpartition("|")[2],
    )
    return True


async def connect_telegram(d: Daemon, sessions: SessionLeases) -> bool:
    """Build the Telegram session and the store, then connect, retrying with backoff
    (``False``: stopped, or the session is revoked)."""
    from worker.storage import store_from_settings

    s = d.settings
    d.telegram = _telegram_session(d)
    d.store = store_from_settings(s)
    attempt = 0
    while not d.stop.is_set():
        try:
            await d.telegram.connect()
            return True
        except SessionRevoked as exc:
            await _session_revoked(d, sessions, exc)
            return False
        except FetchError as exc:
            attempt += 1
            delay = min(s.backoff_max_seconds, s.backoff_base_seconds * 2**attempt)
            d.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
            logger.warning(
                "telegram connect failed ({}: {}); retrying in {:.1f}s",
                exc.type_name,
                exc,
                delay,
                event="telegram_connect_failed",
                error_type=exc.type_name,
                wait_seconds=round(delay, 3),
            )
            await d.sleep(delay)
    return False


def _telegram_session(d: Daemon) -> Any:
    """The session's client, behind the fleet's request gate unless RATE_LIMIT_STRATEGY=off."""
    from worker.telegram import TelegramSession

    s = d.settings
    gate: Any = None
    if s.rate_limit_strategy != "off":
        from worker.fleet_gate import FleetGate

        gate = FleetGate(
            d.redis,
            d.keys,
            d.session_name or "sim",
            s,
            SystemClock(),
            worker_id=d.worker_id,
            metrics=d.metrics,
        )
    return TelegramSession(
        s,
        d.session_name or "sim",
        gate=gate,
        metrics=d.metrics,
        client_factory=d.backend.client_factory,
    )


async def _session_revoked(d: Daemon, sessions: SessionLeases, exc: SessionRevoked) -> None:
    d.begin_stop(Exit.SESSION_REVOKED, f"session revoked: {exc}")
    with contextlib.suppress(*REDIS_DOWN):
        await sessions.mark_bad(str(exc), d.worker_id)


__all__ = ["claim_worker_lease", "connect_telegram"]
