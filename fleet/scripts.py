"""The one registry of the fleet's Lua scripts (``fleet/lua/*.lua``), registered once per client.

Every script is a file in ``fleet/lua`` whose header documents its keys and arguments (the key
schema is :mod:`fleet.keys`). :func:`scripts_for` registers all of them on a Redis client the
first time it is asked and caches the result per client object, so the bucket, breaker, gate,
queue, leases and scheduler sharing a client share the registrations. redis-py's registered
script objects call ``EVALSHA`` and reload the source on ``NOSCRIPT``, so they keep working
after ``SCRIPT FLUSH`` and after a Redis restart.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_cache: weakref.WeakKeyDictionary[Redis, Scripts] = weakref.WeakKeyDictionary()


@cache
def lua_source(name: str) -> str:
    """The text of ``fleet/lua/<name>.lua``."""
    return (resources.files("fleet") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scripts:
    """One registered script per file of ``fleet/lua``, named like the file."""

    # rate limiting (fleet.bucket, fleet.breaker)
    bucket: AsyncScript
    flood: AsyncScript
    breaker: AsyncScript
    # leases: workers, sessions and the governor's leader lease share one pair of scripts
    lease: AsyncScript
    unlease: AsyncScript
    # the reliable queue (worker.queue, fleet.recovery, fleet.deadletters)
    replace: AsyncScript
    ack: AsyncScript
    dead_letter: AsyncScript
    retry_later: AsyncScript
    promote: AsyncScript
    release: AsyncScript
    recover: AsyncScript
    requeue_dead: AsyncScript
    # the governor's scheduler
    schedule: AsyncScript
    schedule_tick: AsyncScript  # the incremental scheduler (issue 14)
    # per-day parts of a split command (worker.parts, issue 14)
    split: AsyncScript
    part_done: AsyncScript
    split_close: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        return cls(**{f.name: client.register_script(lua_source(f.name)) for f in fields(cls)})


def scripts_for(client: Redis) -> Scripts:
    """The scripts registered on ``client`` (registered on first use)."""
    found = _cache.get(client)
    if found is None:
        found = _cache[client] = Scripts.register(client)
    return found


def text(value: Any) -> str:
    """A Redis reply element as ``str`` (clients may or may not decode responses)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def as_bytes(value: Any) -> bytes:
    """A Redis reply element as ``bytes`` (raw payloads are compared and stored byte for byte)."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
