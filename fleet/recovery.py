"""Recovery of dead workers' commands, run by every worker and by the governor.

Each worker holds a lease ``worker:<worker_id>`` (a random token, PX TTL) refreshed by its
heartbeat. :func:`recover` moves the processing list of every worker whose lease is gone back to
the head of ``tg_commands`` inside ``lua/recover.lua``, which checks the lease atomically, so a
live worker's commands are never taken from it. A command recovered ``COMMAND_MAX_DELIVERIES``
times goes to the dead-letter list instead. :func:`recover` also moves due delayed retries back
to the queue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.asyncio import Redis

from fleet.clock import utc_iso
from fleet.deadletters import DeadLetter
from fleet.keys import Keys
from fleet.scripts import as_bytes, scripts_for, text


@dataclass
class RecoveryReport:
    recovered: dict[str, int] = field(default_factory=dict)  # worker_id -> commands requeued
    dead_lettered: list[DeadLetter] = field(default_factory=list)
    promoted: int = 0  # delayed retries moved back to the queue

    @property
    def total(self) -> int:
        return sum(self.recovered.values())


async def recover(
    client: Redis,
    keys: Keys,
    *,
    max_deliveries: int = 3,
    dead_letters_max: int = 10_000,
    scan: bool = False,
    promote_limit: int = 100,
) -> RecoveryReport:
    """Requeue the commands of every worker whose lease expired, and the due delayed retries.

    Workers are found in the ``workers`` registry; with ``scan=True`` also by ``SCAN`` over
    ``processing:*`` (finds lists of workers whose registration was lost; used at start).
    Safe to run from any number of processes at once: the ownership check and the move are
    one Lua script per worker.
    """
    scripts = scripts_for(client)
    report = RecoveryReport()
    report.promoted = int(
        await scripts.promote(keys=[keys.delayed, keys.commands], args=[promote_limit])
    )
    candidates = {text(w) for w in await client.hkeys(keys.workers)}
    if scan:
        prefix = keys.processing("")
        async for key in client.scan_iter(match=keys.processing("*"), count=500):
            candidates.add(text(key)[len(prefix) :])
    if not candidates:
        return report
    ordered = sorted(candidates)
    async with client.pipeline(transaction=False) as pipe:
        for wid in ordered:
            pipe.exists(keys.worker_lease(wid))
        alive = await pipe.execute()
    now_iso = utc_iso(datetime.now(UTC))
    for wid, is_alive in zip(ordered, alive, strict=True):
        if is_alive:
            continue
        reply = await scripts.recover(
            keys=[
                keys.worker_lease(wid),
                keys.processing(wid),
                keys.commands,
                keys.deliveries,
                keys.dead_letters,
                keys.workers,
                keys.running,
            ],
            args=[wid, max_deliveries, dead_letters_max, now_iso, uuid.uuid4().hex[:8]],
        )
        moved = int(reply[0])
        if moved < 0:
            continue  # came back to life between EXISTS and the script
        if moved:
            report.recovered[wid] = moved
        report.dead_lettered.extend(DeadLetter.from_entry(as_bytes(e)) for e in reply[1:])
    return report
