"""Taking commands: the daemon's take loop and the tasks it starts.

Up to ``PARALLELISM_MAX`` commands run at once, each in its own task (``CommandExecutor.execute``);
every task's processing-list entry is known (``Daemon.held``), so that entries no task holds (a
``BLMOVE`` whose reply was lost with its connection) are adopted once a lease period. After
``STORAGE_FAILURES_PAUSE`` executions in a row failed on this worker's own storage, it takes
nothing (and reports ``storage_error``) until a probe write in ``DATA_DIR`` works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.exitcodes import Exit
from fleet.redisconn import RedisUnavailable
from worker.executor import CommandExecutor
from worker.queue import WorkQueue
from worker.status import write_health

if TYPE_CHECKING:
    from worker.daemon import Daemon

# Executions in a row failing on this worker's own storage before it stops taking commands
# (and reports unhealthy) until a probe write in DATA_DIR succeeds again.
STORAGE_FAILURES_PAUSE = 3


async def take_loop(d: Daemon, queue: WorkQueue, executor: CommandExecutor) -> None:
    s = d.settings
    reconciled = d.clock.monotonic()
    while not d.stop.is_set():
        # A command waiting for its chat (another command on it runs here) takes no slot,
        # but at most PARALLELISM_MAX of them are held, so one chat cannot hoard the queue.
        active = len(d.tasks) - executor.waiting
        if active >= s.parallelism_max or len(d.tasks) >= 2 * s.parallelism_max:
            d.slot_freed.clear()
            await d.wait_any(d.slot_freed, 1.0)
            continue
        if executor.storage_failures >= STORAGE_FAILURES_PAUSE:
            await _storage_pause(d, executor)
            continue
        if d.clock.monotonic() - reconciled >= s.worker_lease_seconds:
            await _adopt_orphans(d, queue, executor)
            reconciled = d.clock.monotonic()
        # Never a cancelled blocking pop (redis-py would drop the connection and the popped
        # command): a short timeout, then the stop flag is checked again.
        raw = await d.link.call(lambda: queue.take(s.command_pop_timeout_seconds), "take command")
        if raw is None:
            continue
        if d.stop.is_set():
            break  # it stays in the processing list; release_all hands it back
        _spawn(d, executor, raw)


async def _storage_pause(d: Daemon, executor: CommandExecutor) -> None:
    """Our storage failed several executions in a row (disk full, read-only mount, I/O
    errors): take nothing (other workers take the commands), report unhealthy, and probe
    the storage until a write works again."""
    s = d.settings
    if d.status != "storage_error":
        logger.error(
            "{} commands in a row failed on storage; not taking commands until {} is "
            "writable again",
            executor.storage_failures,
            s.data_dir,
            event="storage_unhealthy",
        )
        write_health(d, "storage_error")
    await d.sleep(min(5.0, max(0.5, s.worker_lease_seconds / 3)))
    if d.stop.is_set():
        return
    problem = await asyncio.to_thread(probe_storage, s.data_dir, d.worker_id)
    if problem is None:
        logger.info("storage is writable again; taking commands", event="storage_healthy")
        executor.storage_failures = 0
        write_health(d, "busy" if d.running else "idle")
    else:
        logger.debug("storage still failing: {}", problem)


def _spawn(d: Daemon, executor: CommandExecutor, raw: bytes) -> None:
    task = asyncio.create_task(executor.execute(raw))
    d.held[task] = raw
    d.tasks.add(task)
    task.add_done_callback(partial(_task_done, d))


async def _adopt_orphans(d: Daemon, queue: WorkQueue, executor: CommandExecutor) -> None:
    """Run what is in our processing list but in no task of ours: a BLMOVE whose reply was
    lost with its connection (Redis restarted after moving the command) leaves it there.
    Called between takes only, so no BLMOVE is in flight."""
    known = Counter(d.held.values())
    for raw in await d.link.call(queue.held, "reconcile"):
        if known[raw] > 0:
            known[raw] -= 1
            continue
        logger.warning("running a command found in our processing list without a task")
        _spawn(d, executor, raw)


def _task_done(d: Daemon, task: asyncio.Task[None]) -> None:
    d.held.pop(task, None)
    d.tasks.discard(task)
    d.slot_freed.set()
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if isinstance(exc, RedisUnavailable):
            d.begin_stop(Exit.REDIS_UNAVAILABLE, f"redis unavailable: {exc}")
        else:
            logger.opt(exception=exc).error("command task crashed")


def probe_storage(data_dir: Any, worker_id: str) -> str | None:
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


__all__ = ["STORAGE_FAILURES_PAUSE", "probe_storage", "take_loop"]
