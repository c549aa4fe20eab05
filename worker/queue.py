"""The reliable command queue as one worker sees it: take, ack, retry later, dead-letter, release.

A worker takes a command with ``BLMOVE tg_commands processing:<worker_id> LEFT RIGHT`` (a short
timeout, looped on the stop Event: a blocking pop is never cancelled, because redis-py would drop
the connection together with the popped item). The command stays in the worker's processing
list until its execution ended: :meth:`WorkQueue.ack` after the files, the progress and the
terminal event; :meth:`WorkQueue.retry_later` or :meth:`WorkQueue.dead_letter` otherwise. A
stopping worker hands back what it holds with :meth:`WorkQueue.release_all`.

The commands of dead workers are recovered by :func:`fleet.recovery.recover` (run by every
worker and by the governor). Every key is named by :class:`fleet.keys.Keys`; every script is a
file in ``fleet/lua`` from the one registry :func:`fleet.scripts.scripts_for`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from fleet.clock import Clock, SystemClock
from fleet.deadletters import DeadLetter
from fleet.keys import Keys
from fleet.scripts import as_bytes, scripts_for, text
from worker.sessions import lease_token


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
        events_maxlen: int = 10_000,
        clock: Clock | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        # Random, then "|host:pid": a restart on the same host can prove this holder dead.
        self.token = lease_token()
        self.lease_ms = max(1, int(lease_s * 1000))
        self.completed_ttl_ms = int(completed_ttl_s * 1000)
        self.dead_letters_max = dead_letters_max
        self.payload_max = dead_letter_payload_max_bytes
        self.events_maxlen = events_maxlen
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

    @property
    def owner(self) -> str:
        """What ``running[command_id]`` holds for an execution of this process: the worker id
        and its lease token (a restart under the same ``WORKER_ID`` is another owner)."""
        return f"{self.worker_id}|{self.token}"

    def _event_args(self, event: Mapping[str, Any] | None) -> list[Any]:
        data = "" if event is None else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return [self.token, data, self.keys.events_channel, self.events_maxlen]

    async def ack(
        self,
        raw: bytes,
        command_id: str | None,
        *,
        completed: bool,
        event: Mapping[str, Any] | None = None,
        mark: tuple[str, int, str] | None = None,
    ) -> bool:
        """The execution ended; ``completed`` also records the id as done, ``event`` (the
        terminal event) is published in the same step. ``False``, with nothing done or
        published, if the command had been taken away from this worker (its lease expired).
        ``mark`` = ``(chat key, message id, day)``: advance that chat's high-water mark in the
        same atomic step (a completed command with ``after_id``; issue 14)."""
        keys = [
            self.processing,
            self.keys.completed,
            self.keys.deliveries,
            self.keys.retries,
            self.keys.running,
            self.lease_key,
            self.keys.events_stream,
        ]
        args: list[Any] = [
            raw,
            command_id or "",
            "1" if completed else "0",
            self.completed_ttl_ms,
            *self._event_args(event),
        ]
        if mark is not None:
            keys.append(self.keys.hwm)
            args.extend(mark)
        removed = await self.scripts.ack(keys=keys, args=args)
        return int(removed) > 0

    async def made_progress(self, command_id: str) -> None:
        """This execution completed a day or wrote a page: the deaths of earlier executions
        were not the command's fault (recover.lua counts only attempts without progress)."""
        await self.client.hdel(self.keys.deliveries, command_id)

    async def completed_at(self, command_id: str) -> float | None:
        """When (Unix seconds) ``command_id`` completed, if within the retention."""
        score = await self.client.zscore(self.keys.completed, command_id)
        if score is None:
            return None
        seconds = float(score) / 1000.0
        if seconds < self.clock.now().timestamp() - self.completed_ttl_ms / 1000.0:
            return None
        return seconds

    async def retries(self, command_id: str) -> int:
        value = await self.client.hget(self.keys.retries, command_id)
        return int(value) if value is not None else 0

    async def retry_later(
        self,
        raw: bytes,
        command_id: str,
        delay_s: float,
        *,
        count: bool = True,
        event: Mapping[str, Any] | None = None,
    ) -> int:
        """Park the command until ``delay_s`` from now (Redis time) and publish ``event`` in
        the same step; returns its retry count, -1 (nothing done) if it was not ours any more.
        ``count=False``: a deferral (a duplicate of a command running elsewhere), not a retry."""
        return int(
            await self.scripts.retry_later(
                keys=[
                    self.processing,
                    self.keys.delayed,
                    self.keys.retries,
                    self.keys.running,
                    self.lease_key,
                    self.keys.events_stream,
                    self.keys.deliveries,
                ],
                args=[
                    raw,
                    command_id,
                    max(0, int(delay_s * 1000)),
                    "1" if count else "0",
                    *self._event_args(event),
                ],
            )
        )

    async def claim_run(self, command_id: str) -> str | None:
        """Record that this process executes ``command_id``; ``None`` if it may, else the id of
        the live worker already executing it. Owners are compared by lease token, not worker id:
        an entry left by a dead process (even one restarted under our ``WORKER_ID``), or by a
        worker whose lease is gone or now held under another token, does not count."""
        if await self.client.hsetnx(self.keys.running, command_id, self.owner):
            return None
        found = await self.client.hget(self.keys.running, command_id)
        owner = "" if found is None else text(found)
        owner_id, _, owner_token = owner.partition("|")
        if owner and owner != self.owner and owner_token:
            holder = await self.client.get(self.keys.worker_lease(owner_id))
            if holder is not None and text(holder) == owner_token:
                return owner_id
        await self.client.hset(self.keys.running, command_id, self.owner)
        return None

    async def dead_letter(
        self, raw: bytes, letter: DeadLetter, *, event: Mapping[str, Any] | None = None
    ) -> bool:
        """Move the command to the dead letters and publish ``event`` in the same step;
        ``False`` (no letter, no event) if it was not ours any more."""
        removed = await self.scripts.dead_letter(
            keys=[
                self.processing,
                self.keys.dead_letters,
                self.keys.deliveries,
                self.keys.retries,
                self.keys.running,
                self.lease_key,
                self.keys.events_stream,
            ],
            args=[
                raw,
                letter.to_json(self.payload_max),
                self.dead_letters_max,
                letter.command_id or "",
                *self._event_args(event),
            ],
        )
        return int(removed) > 0

    async def release_all(self) -> int:
        """Hand every held command back to the head of the queue (stopping); -1 if the lease
        is held by another process (then a recovery is entitled to do it)."""
        return int(
            await self.scripts.release(
                keys=[self.processing, self.keys.commands, self.lease_key], args=[self.token]
            )
        )
