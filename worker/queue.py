"""The reliable command queue: take, ack, retry later, dead-letter, release, recover.

A worker takes a command with ``BLMOVE tg_commands processing:<worker_id> LEFT RIGHT`` (a short
timeout, looped on the stop Event: a blocking pop is never cancelled, because redis-py would drop
the connection together with the popped item). The command stays in the worker's processing
list until its execution ended: :meth:`WorkQueue.ack` after the files, the progress and the
terminal event; :meth:`WorkQueue.retry_later` or :meth:`WorkQueue.dead_letter` otherwise. A
stopping worker hands back what it holds with :meth:`WorkQueue.release_all`.

Each worker holds a lease ``worker:<worker_id>`` (a random token, PX TTL) refreshed by its
heartbeat. :func:`recover` — run by every worker at start and periodically, and by the governor
— moves the processing list of every worker whose lease is gone back to the head of
``tg_commands`` inside ``lua/recover.lua``, which checks the lease atomically, so a live
worker's commands are never taken from it. A command recovered ``COMMAND_MAX_DELIVERIES``
times goes to the dead-letter list instead. :func:`recover` also moves due delayed retries
back to the queue.

Every key is named by :class:`governor.keys.Keys`; every script is a file in ``worker/lua``
registered through redis-py's ``register_script`` (``EVALSHA`` with a reload on ``NOSCRIPT``,
so a ``SCRIPT FLUSH`` or a Redis restart is harmless). The dead-letter records are in
:mod:`worker.deadletters`; the connection and outage handling in :mod:`worker.redislink`
(both re-exported here, where the queue's users import them from).
"""

from __future__ import annotations

import json
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from governor.keys import Keys
from governor.scripts import as_bytes, lua_source, text
from worker.clock import utc_iso
from worker.deadletters import DeadLetter, list_dead_letters, new_dead_letter
from worker.redislink import REDIS_DOWN, RedisLink, RedisUnavailable, connect

__all__ = [
    "REDIS_DOWN",
    "DeadLetter",
    "RecoveryReport",
    "RedisLink",
    "RedisUnavailable",
    "WorkQueue",
    "connect",
    "list_dead_letters",
    "new_dead_letter",
    "recover",
    "requeue_dead_letter",
    "scripts_for",
]

T = TypeVar("T")

# --- scripts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueScripts:
    lease: AsyncScript
    unlease: AsyncScript
    replace: AsyncScript
    ack: AsyncScript
    dead_letter: AsyncScript
    retry_later: AsyncScript
    promote: AsyncScript
    release: AsyncScript
    recover: AsyncScript
    requeue_dead: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> QueueScripts:
        names = cls.__dataclass_fields__
        return cls(**{name: client.register_script(lua_source(name, "worker")) for name in names})


_scripts: weakref.WeakKeyDictionary[Redis, QueueScripts] = weakref.WeakKeyDictionary()


def scripts_for(client: Redis) -> QueueScripts:
    """The queue's scripts registered on ``client`` (once per client object)."""
    found = _scripts.get(client)
    if found is None:
        found = _scripts[client] = QueueScripts.register(client)
    return found


# --- dead letters (the records live in worker/deadletters.py) -------------------------


async def requeue_dead_letter(client: Redis, keys: Keys, letter_id: str) -> DeadLetter | None:
    """Put a dead letter's payload back at the tail of ``tg_commands`` (and forget its
    delivery count, so it gets its full chances again). ``None`` if there is no such entry;
    ``ValueError`` if its payload was truncated and cannot be requeued."""
    for entry in await client.lrange(keys.dead_letters, 0, -1):
        letter = DeadLetter.from_entry(as_bytes(entry))
        if letter.id != letter_id:
            continue
        if letter.truncated or letter.payload is None:
            raise ValueError(f"dead letter {letter_id}'s payload was truncated; cannot requeue")
        done = await scripts_for(client).requeue_dead(
            keys=[
                keys.dead_letters,
                keys.commands,
                keys.deliveries,
                keys.retries,
                keys.completed,
            ],
            args=[entry, letter.payload, letter.command_id or ""],
        )
        if not int(done):
            return None
        return letter
    return None


# --- one worker's side of the queue ----------------------------------------------------------


class WorkQueue:
    """The queue as one worker sees it: its processing list and its lease."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        worker_id: str,
        *,
        lease_s: float = 10.0,
        completed_ttl_s: float = 7 * 86400,
        dead_letters_max: int = 10_000,
        dead_letter_payload_max_bytes: int = 1 << 20,
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.token = uuid.uuid4().hex
        self.lease_ms = max(1, int(lease_s * 1000))
        self.completed_ttl_ms = int(completed_ttl_s * 1000)
        self.dead_letters_max = dead_letters_max
        self.payload_max = dead_letter_payload_max_bytes
        self.scripts = scripts_for(client)
        self.processing = keys.processing(worker_id)
        self.lease_key = keys.worker_lease(worker_id)

    # --- lease --------------------------------------------------------------------------
    async def claim_lease(self, info: dict[str, Any]) -> int:
        """Take or refresh the worker lease: 1 refreshed, 2 taken (was free), 0 held by another
        process (a previous run that died and whose lease has not expired, or a duplicate
        ``WORKER_ID``). Registers the worker in ``workers`` when held."""
        result = int(
            await self.scripts.lease(keys=[self.lease_key], args=[self.token, self.lease_ms])
        )
        if result == 2:
            await self.client.hset(
                self.keys.workers, self.worker_id, json.dumps(info, separators=(",", ":"))
            )
        return result

    async def drop_lease(self) -> None:
        await self.scripts.unlease(keys=[self.lease_key], args=[self.token])

    async def holds(self, raw: bytes) -> bool:
        """Is ``raw`` still in this worker's processing list (not recovered by someone)?"""
        return await self.client.lpos(self.processing, raw) is not None  # type: ignore[arg-type]

    async def held(self) -> list[bytes]:
        """Every entry of this worker's processing list."""
        return [as_bytes(e) for e in await self.client.lrange(self.processing, 0, -1)]

    # --- take / ack ---------------------------------------------------------------------
    async def take(self, timeout_s: float) -> bytes | None:
        """Move the next command into the processing list; ``None`` after ``timeout_s``."""
        raw = await self.client.blmove(
            self.keys.commands,
            self.processing,
            timeout_s,  # type: ignore[arg-type]  # Redis >= 6 takes fractional seconds
            "LEFT",
            "RIGHT",
        )
        return None if raw is None else as_bytes(raw)

    async def replace(self, old: bytes, new: bytes) -> bool:
        """Store ``new`` in place of ``old`` in the processing list (the id assigned to a
        command without one survives a crash)."""
        return bool(await self.scripts.replace(keys=[self.processing], args=[old, new]))

    async def ack(self, raw: bytes, command_id: str | None, *, completed: bool) -> bool:
        """The execution ended; ``completed`` also records the id as done. ``False`` if the
        command had already been taken away from this worker (its lease had expired)."""
        removed = await self.scripts.ack(
            keys=[
                self.processing,
                self.keys.completed,
                self.keys.deliveries,
                self.keys.retries,
                self.keys.running,
            ],
            args=[raw, command_id or "", "1" if completed else "0", self.completed_ttl_ms],
        )
        return int(removed) > 0

    async def completed_at(self, command_id: str) -> float | None:
        """When (Unix seconds) ``command_id`` completed, if within the retention."""
        score = await self.client.zscore(self.keys.completed, command_id)
        if score is None:
            return None
        seconds = float(score) / 1000.0
        if seconds < time.time() - self.completed_ttl_ms / 1000.0:
            return None
        return seconds

    async def retries(self, command_id: str) -> int:
        value = await self.client.hget(self.keys.retries, command_id)
        return int(value) if value is not None else 0

    async def retry_later(
        self, raw: bytes, command_id: str, delay_s: float, *, count: bool = True
    ) -> int:
        """Park the command until ``delay_s`` from now (Redis time); returns its retry count.
        ``count=False``: a deferral (a duplicate of a command running elsewhere), not a retry."""
        return int(
            await self.scripts.retry_later(
                keys=[self.processing, self.keys.delayed, self.keys.retries, self.keys.running],
                args=[raw, command_id, max(0, int(delay_s * 1000)), "1" if count else "0"],
            )
        )

    async def claim_run(self, command_id: str) -> str | None:
        """Record that this worker executes ``command_id``; ``None`` if it may, else the id of
        the live worker already executing it (a worker whose lease is gone does not count)."""
        if await self.client.hsetnx(self.keys.running, command_id, self.worker_id):
            return None
        owner = await self.client.hget(self.keys.running, command_id)
        owner_id = None if owner is None else text(owner)
        if owner_id in (None, self.worker_id) or not await self.client.exists(
            self.keys.worker_lease(owner_id or "")
        ):
            await self.client.hset(self.keys.running, command_id, self.worker_id)
            return None
        return owner_id

    async def dead_letter(self, raw: bytes, letter: DeadLetter) -> None:
        await self.scripts.dead_letter(
            keys=[
                self.processing,
                self.keys.dead_letters,
                self.keys.deliveries,
                self.keys.retries,
                self.keys.running,
            ],
            args=[
                raw,
                letter.to_json(self.payload_max),
                self.dead_letters_max,
                letter.command_id or "",
            ],
        )

    async def release_all(self) -> int:
        """Hand every held command back to the head of the queue (stopping); -1 if the lease
        is held by another process (then a recovery is entitled to do it)."""
        return int(
            await self.scripts.release(
                keys=[self.processing, self.keys.commands, self.lease_key], args=[self.token]
            )
        )


# --- recovery (workers and governor) ----------------------------------------------------------


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
