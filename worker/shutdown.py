"""The worker's staged shutdown, within ``SHUTDOWN_GRACE_SECONDS`` of its start.

1. Stop taking; running fetches stop after their current page (progress saved). A hard-stop
   guard is armed first: at ``grace - 1 s`` every wait and Redis call below gives up.
2. Wait for the running commands until ``grace - margin``; cancel the ones left.
3. End the background loops (heartbeat, recovery).
4. Hand the commands not finished back to the head of ``tg_commands``; drop the worker lease,
   unregister; mark the session bad if it was revoked; release the session lease.
5. Close Telegram and Redis, remove the health file, log the summary (``shutdown_completed``).
6. Final metrics push (and delete of our Pushgateway group), flush the log shipper.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from loguru import logger

from fleet.exitcodes import Exit
from fleet.redisconn import RedisUnavailable
from worker.queue import WorkQueue
from worker.sessions import SessionLeases
from worker.status import write_health

if TYPE_CHECKING:
    from worker.daemon import Daemon


async def shut_down(
    d: Daemon,
    queue: WorkQueue | None,
    sessions: SessionLeases,
    background: list[asyncio.Task[None]],
) -> None:
    grace = d.settings.shutdown_grace_seconds
    d.begin_stop(d.exit_code, d.exit_reason)
    began = d.clock.monotonic()
    # The hard-stop guard is armed first: whatever below waits on Redis or on a task gives
    # up at the hard end of the grace period (force aborts RedisLink calls and the waits).
    hard_end = began + max(0.2, grace - 1.0)
    loop = asyncio.get_running_loop()
    guard = loop.call_later(max(0.1, hard_end - d.clock.monotonic()), d.hard_stop)
    logger.info(
        "shutdown started ({}): {} commands running, grace {:.0f}s",
        d.exit_reason,
        len(d.tasks),
        grace,
        event="shutdown_started",
        reason=d.exit_reason,
        running=len(d.tasks),
    )
    # Leave time after the fetches for handing commands back and closing, inside the grace.
    margin = min(5.0, grace * 0.3)
    write_health(d, "stopping")
    await _finish_commands(d, began + max(0.5, grace - margin), hard_end)
    await _end_background(d, background, hard_end)
    try:
        await _hand_back(d, queue, sessions)
    finally:
        guard.cancel()
        await _close(d, began + grace)
        _log_summary(d, began)
        await _stop_exporters(d, began)


async def _finish_commands(d: Daemon, deadline: float, hard_end: float) -> None:
    """Let the running commands checkpoint until ``deadline``; then cancel what is left."""
    if not d.tasks:
        return
    logger.info("waiting for {} running commands to checkpoint", len(d.tasks))
    pending = set(d.tasks)
    while pending and not d.force.is_set():
        left = deadline - d.clock.monotonic()
        if left <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=min(left, 0.2))
    if pending:
        logger.warning("cancelling {} commands (grace over or forced)", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=_left(d, hard_end, 5.0))


async def _end_background(d: Daemon, background: list[asyncio.Task[None]], hard_end: float) -> None:
    # The flag first: a loop that lost its cancellation (see Daemon.halt) still ends.
    d.halt.set()
    for task in background:
        task.cancel()
    if background:
        _done, stuck = await asyncio.wait(background, timeout=_left(d, hard_end, 2.0))
        if stuck:
            logger.warning("background tasks still running: {}", [t.get_name() for t in stuck])


async def _hand_back(d: Daemon, queue: WorkQueue | None, sessions: SessionLeases) -> None:
    """Give back what we hold in Redis: commands, worker lease, registration, session lease.
    Redis down: the leases expire and recovery hands the commands back instead."""
    if queue is not None:
        with contextlib.suppress(RedisUnavailable):
            moved = await d.link.call(queue.release_all, "hand back commands")
            if moved > 0:
                logger.info("handed {} commands back to the head of the queue", moved)
            elif moved < 0:
                logger.warning("lease held elsewhere; recovery will hand our commands back")
            await d.link.call(queue.drop_lease, "drop lease")
            await d.link.call(lambda: d.redis.hdel(d.keys.workers, d.worker_id), "unregister")
    with contextlib.suppress(RedisUnavailable):
        if d.exit_code == Exit.SESSION_REVOKED:
            await d.link.call(lambda: sessions.mark_bad(d.exit_reason, d.worker_id), "mark bad")
        await d.link.call(sessions.release, "release session")


async def _close(d: Daemon, end: float) -> None:
    """Close Telegram and Redis (each bounded, never past the grace), remove the health file."""
    if d.telegram is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(d.telegram.close(), timeout=_left(d, end, 3.0))
    if d.client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(d.client.aclose(), timeout=_left(d, end, 1.0))
    d.health.remove()


def _log_summary(d: Daemon, began: float) -> None:
    waited = d.clock.monotonic() - began
    last = d.tally.last_command or {}
    logger.info(
        "worker {} stopped ({}), exit {}, {} commands served, {:.1f}s to stop, last command {}",
        d.worker_id,
        d.exit_reason,
        d.exit_code,
        d.tally.served,
        waited,
        last.get("command_id", "none"),
        event="shutdown_completed",
        reason=d.exit_reason,
        exit_code=d.exit_code,
        waited_seconds=round(waited, 3),
        duration_ms=int(waited * 1000),
        commands_served=d.tally.served,
        last_command_id=last.get("command_id"),
        last_command_chat=last.get("chat"),
        last_command_status=last.get("status"),
    )


async def _stop_exporters(d: Daemon, began: float) -> None:
    """The last stage: final push and delete of our Pushgateway group, stop serving, then
    flush the log shipper (so what the exporters said on the way out is shipped too)."""
    left = d.settings.shutdown_grace_seconds - (d.clock.monotonic() - began)
    if d.exporters is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(d.exporters.stop, max(1.0, min(5.0, left - 0.5)))
    if d.shipper is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(d.shipper.close, max(0.5, min(5.0, left - 1.0)))


def _left(d: Daemon, until: float, cap: float) -> float:
    """A bounded wait: at most ``cap``, never past ``until`` (but a little, to finish)."""
    return max(0.1, min(cap, until - d.clock.monotonic()))


__all__ = ["shut_down"]
