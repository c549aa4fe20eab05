"""The Lua scripts of ``governor/lua``, registered once per Redis client.

redis-py's registered script objects call ``EVALSHA`` and reload the source on ``NOSCRIPT``, so
they keep working after ``SCRIPT FLUSH`` and after a Redis restart. :func:`scripts_for` caches
one :class:`Scripts` per client object, so every bucket, breaker and gate sharing a client
shares the registrations.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_cache: weakref.WeakKeyDictionary[Redis, Scripts] = weakref.WeakKeyDictionary()


@cache
def lua_source(name: str, package: str = "governor") -> str:
    """The text of ``<package>/lua/<name>.lua`` (the governor's scripts, or the worker's)."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scripts:
    bucket: AsyncScript
    flood: AsyncScript
    breaker: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        return cls(
            bucket=client.register_script(lua_source("bucket")),
            flood=client.register_script(lua_source("flood")),
            breaker=client.register_script(lua_source("breaker")),
        )


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
