"""Dead letters: what a command that can never run (invalid, or killing its workers) leaves.

A :class:`DeadLetter` is stored as JSON in the dead-letter list (newest first, capped at
``DEAD_LETTERS_MAX``), with the reason, the time, the worker, and the raw payload (base64 if it
is not UTF-8; truncated above ``DEAD_LETTER_PAYLOAD_MAX_BYTES``, and then not requeueable).
``python -m worker dead-letters`` lists them; :func:`requeue_dead_letter` puts one
back on the queue.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from fleet.clock import utc_iso
from fleet.keys import Keys
from fleet.scripts import as_bytes, scripts_for


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter list (stored as JSON, newest first)."""

    id: str
    ts: str
    reason: str
    error_type: str
    command_id: str | None
    chat: str | None
    worker_id: str | None
    source: str  # "validation" | "recovery" | "retry" | "internal"
    payload: bytes | None  # the raw command (None if truncated beyond use)
    payload_bytes: int
    truncated: bool
    raw_entry: bytes = field(default=b"", repr=False, compare=False)

    def to_json(self, max_payload_bytes: int) -> str:
        data: dict[str, Any] = {
            "id": self.id,
            "ts": self.ts,
            "reason": self.reason,
            "error_type": self.error_type,
            "command_id": self.command_id,
            "chat": self.chat,
            "worker_id": self.worker_id,
            "source": self.source,
            "payload_bytes": self.payload_bytes,
            "truncated": False,
        }
        payload = self.payload or b""
        if len(payload) > max_payload_bytes:
            # A 10 MB junk payload is kept as a prefix: enough to see what it was, and the
            # dead-letter list cannot grow by gigabytes. Such a payload cannot be requeued.
            payload = payload[:max_payload_bytes]
            data["truncated"] = True
        try:
            data["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            data["payload_b64"] = base64.b64encode(payload).decode("ascii")
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_entry(cls, entry: bytes) -> DeadLetter:
        try:
            data = json.loads(entry.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        payload: bytes | None
        if isinstance(data.get("payload_b64"), str):
            payload = base64.b64decode(data["payload_b64"])
        elif isinstance(data.get("payload"), str):
            payload = data["payload"].encode("utf-8", "surrogateescape")
        else:
            payload = None

        def opt(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        return cls(
            id=str(data.get("id", "?")),
            ts=str(data.get("ts", "?")),
            reason=str(data.get("reason", "?")),
            error_type=str(data.get("error_type", "?")),
            command_id=opt("command_id"),
            chat=opt("chat"),
            worker_id=opt("worker_id"),
            source=str(data.get("source", "?")),
            payload=payload,
            payload_bytes=int(data.get("payload_bytes", len(payload or b""))),
            truncated=bool(data.get("truncated", False)),
            raw_entry=entry,
        )


def new_dead_letter(
    raw: bytes,
    *,
    reason: str,
    error_type: str,
    command_id: str | None,
    chat: str | None,
    worker_id: str | None,
    source: str,
) -> DeadLetter:
    return DeadLetter(
        id=uuid.uuid4().hex[:12],
        ts=utc_iso(datetime.now(UTC)),
        reason=reason,
        error_type=error_type,
        command_id=command_id,
        chat=chat,
        worker_id=worker_id,
        source=source,
        payload=raw,
        payload_bytes=len(raw),
        truncated=False,
    )


async def list_dead_letters(client: Redis, keys: Keys, limit: int = 100) -> list[DeadLetter]:
    """The newest ``limit`` dead letters (``limit`` ≤ 0: all)."""
    entries = await client.lrange(keys.dead_letters, 0, limit - 1 if limit > 0 else -1)
    return [DeadLetter.from_entry(as_bytes(e)) for e in entries]


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
                keys.running,
            ],
            args=[entry, letter.payload, letter.command_id or ""],
        )
        if not int(done):
            return None
        return letter
    return None
