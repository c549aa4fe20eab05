"""Active channels: the chats the incremental scheduler keeps current (issue 14).

Each channel is one field of the Redis hash ``channels`` (key schema: :mod:`fleet.keys`),
named by the chat's key (the directory name under ``DATA_DIR``) and holding JSON::

    {"chat": "@ru_python", "backfill": 30, "interval": null, "priority": 0,
     "paused": false, "added_at": "2026-12-01T15:00:00Z"}

- ``backfill``: how far back a channel without a high-water mark is fetched, in whole days
  before today (``"full"``: ``PARSER_FULL_BACKFILL_DAYS``);
- ``interval``: seconds between two runs of this channel (``null``: the scheduler's
  ``PARSER_SCHEDULER_INTERVAL_SEC``);
- ``priority``: higher runs first when ``PARSER_MAX_CONCURRENCY`` leaves room for only some;
- ``paused``: kept, with its mark, but not scheduled.

They live in Redis so that every governor (leader or standby) and ``python -m governor
channels …`` see one list, and a failover loses nothing. ``SCHEDULE_CHATS`` and an optional
``channels.yaml`` only *add* channels that are not there yet (at the leader's start): a channel
changed or removed with the command line stays as the operator left it until it is named again.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis

from fleet.chats import parse_chat
from fleet.keys import Keys
from fleet.scripts import text

Backfill = int | Literal["full"]

MAX_BACKFILL_DAYS = 3660  # ten years: anything longer is a typo, not a plan
MIN_INTERVAL_S = 1.0


def parse_backfill(value: object) -> Backfill:
    """``full`` or a whole number of days (0 = today only); ``ValueError`` otherwise."""
    if isinstance(value, str):
        raw = value.strip().lower()
        if raw == "full":
            return "full"
        if not raw.isdigit():
            raise ValueError(f"backfill must be a number of days or 'full', got {value!r}")
        value = int(raw)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"backfill must be a number of days or 'full', got {value!r}")
    if not 0 <= value <= MAX_BACKFILL_DAYS:
        raise ValueError(f"backfill must be 0..{MAX_BACKFILL_DAYS} days, got {value}")
    return value


def parse_interval(value: object) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a number of seconds, got {value!r}") from None
    if not seconds >= MIN_INTERVAL_S or seconds == float("inf"):
        raise ValueError(f"interval must be at least {MIN_INTERVAL_S:g} s, got {value!r}")
    return seconds


def parse_priority(value: object) -> int:
    """A whole number in -1000..1000 (higher runs first)."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,4}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be a whole number, got {value!r}")
    if not -1000 <= value <= 1000:
        raise ValueError(f"priority must be -1000..1000, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Channel:
    """One active channel."""

    chat: str  # display form: "@name" or "-100…"
    backfill: Backfill = 7
    interval: float | None = None
    priority: int = 0
    paused: bool = False
    added_at: str = ""

    @property
    def key(self) -> str:
        return parse_chat(self.chat).key

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: Any) -> Channel:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("chat"), str):
            raise ValueError("not a channel record")
        return cls(
            chat=parse_chat(data["chat"]).display,
            backfill=parse_backfill(data.get("backfill", 7)),
            interval=parse_interval(data.get("interval")),
            priority=parse_priority(data.get("priority", 0)),
            paused=bool(data.get("paused", False)),
            added_at=str(data.get("added_at", "")),
        )

    @classmethod
    def new(
        cls,
        chat: str,
        *,
        backfill: object = 7,
        interval: object = None,
        priority: object = 0,
        paused: bool = False,
    ) -> Channel:
        """A validated channel; ``ValueError`` naming what is wrong."""
        try:
            display = parse_chat(chat).display
        except ValueError as exc:
            raise ValueError(f"{chat!r}: {exc}") from None
        return cls(
            chat=display,
            backfill=parse_backfill(backfill),
            interval=parse_interval(interval),
            priority=parse_priority(priority),
            paused=paused,
            added_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )


class ChannelStore:
    """The ``channels`` hash."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.channels

    async def all(self) -> dict[str, Channel]:
        """Every channel by chat key; a record that does not parse is skipped (and named in
        :attr:`broken`) rather than stopping the scheduler for the others."""
        out: dict[str, Channel] = {}
        self.broken: list[str] = []
        for field, raw in (await self.redis.hgetall(self.key)).items():
            try:
                out[text(field)] = Channel.from_json(raw)
            except (ValueError, TypeError):
                self.broken.append(text(field))
        return out

    async def get(self, chat: str) -> Channel | None:
        raw = await self.redis.hget(self.key, parse_chat(chat).key)
        return None if raw is None else Channel.from_json(raw)

    async def put(self, channel: Channel) -> None:
        await self.redis.hset(self.key, channel.key, channel.to_json())

    async def add_missing(self, channels: list[Channel]) -> list[Channel]:
        """Add those not present (``HSETNX``); returns the ones added."""
        added = []
        for ch in channels:
            if await self.redis.hsetnx(self.key, ch.key, ch.to_json()):
                added.append(ch)
        return added

    async def remove(self, chat: str) -> bool:
        return bool(await self.redis.hdel(self.key, parse_chat(chat).key))

    async def set_paused(self, chat: str, paused: bool) -> Channel | None:
        found = await self.get(chat)
        if found is None:
            return None
        changed = replace(found, paused=paused)
        await self.put(changed)
        return changed


def load_channels_yaml(path: Path) -> list[Channel]:
    """``channels.yaml``: a list (or ``{channels: [...]}``) of chats or mappings with ``chat``
    and optional ``backfill``, ``interval``, ``priority``, ``paused``. ``ValueError`` naming
    the entry that is wrong; nothing is added from a file with an error."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("channels")
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a list of channels")
    out: list[Channel] = []
    for i, entry in enumerate(doc, 1):
        try:
            if isinstance(entry, str):
                out.append(Channel.new(entry))
            elif isinstance(entry, dict) and isinstance(entry.get("chat"), str):
                unknown = set(entry) - {"chat", "backfill", "interval", "priority", "paused"}
                if unknown:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                out.append(
                    Channel.new(
                        entry["chat"],
                        backfill=entry.get("backfill", 7),
                        interval=entry.get("interval"),
                        priority=entry.get("priority", 0),
                        paused=bool(entry.get("paused", False)),
                    )
                )
            else:
                raise ValueError("expected a chat or a mapping with 'chat'")
        except ValueError as exc:
            raise ValueError(f"{path}: entry {i}: {exc}") from None
    return out
