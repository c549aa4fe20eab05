"""The simulator's hidden rate limits: per-account sliding windows and a fleet-wide window.

Per account (one session name): at most ``SIM_HISTORY_REQUESTS`` ``messages.getHistory`` per
``SIM_HISTORY_WINDOW_SECONDS`` and ``SIM_RESOLVE_REQUESTS`` resolves (``contacts.resolveUsername``,
``channels.getChannels``) per ``SIM_RESOLVE_WINDOW_SECONDS``, timed on the injected clock. The
request over the limit gets ``FLOOD_WAIT_N`` with N the whole seconds until the window frees a
slot (at least 1); a refused request does not use a slot. 0 disables a limit.

Fleet-wide (all processes sharing ``REDIS_URL``): at most ``SIM_FLEET_REQUESTS`` history and
resolve requests per ``SIM_FLEET_WINDOW_SECONDS``, a sliding-window log kept atomically in Lua on
Redis ``TIME`` (so host clocks do not matter).

Redis keys (all under ``REDIS_KEY_PREFIX``; the ``{sim}`` hash tag keeps them in one slot):

- ``sim:{sim}:fleet`` (zset, TTL window+1 s): admitted requests, score = Redis time in µs.
- ``sim:{sim}:fleet:seq`` (string counter, TTL window+1 s): unique zset members.
- ``sim:{sim}:limits`` (hash, no TTL, written by benchmarks/tests): fields ``history_requests``,
  ``history_window_seconds``, ``resolve_requests``, ``resolve_window_seconds``,
  ``fleet_requests``, ``fleet_window_seconds`` override the settings; re-read at most once a
  second, so a benchmark can move the hidden limit while the fleet runs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.scripts import text

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from fleet.clock import Clock
    from worker.sim.settings import SimSettings

# KEYS[1] zset of admitted requests (score: Redis time in µs), KEYS[2] member counter.
# ARGV[1] limit, ARGV[2] window in ms. Returns 0 (admitted) or the whole seconds to wait (>= 1).
FLEET_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  return math.max(1, math.ceil(wait / 1000000))
end
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], now, seq)
local ttl = math.ceil(window / 1000) + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 0
"""

LIMIT_FIELDS = (
    "history_requests",
    "history_window_seconds",
    "resolve_requests",
    "resolve_window_seconds",
    "fleet_requests",
    "fleet_window_seconds",
)


def sim_key(prefix: str, name: str) -> str:
    return f"{prefix}sim:{{sim}}:{name}"


@dataclass(frozen=True, slots=True)
class Limits:
    history_requests: int = 30
    history_window_seconds: float = 30.0
    resolve_requests: int = 20
    resolve_window_seconds: float = 60.0
    fleet_requests: int = 0
    fleet_window_seconds: float = 1.0

    @classmethod
    def from_settings(cls, settings: SimSettings) -> Limits:
        return cls(
            history_requests=settings.sim_history_requests,
            history_window_seconds=settings.sim_history_window_seconds,
            resolve_requests=settings.sim_resolve_requests,
            resolve_window_seconds=settings.sim_resolve_window_seconds,
            fleet_requests=settings.sim_fleet_requests,
            fleet_window_seconds=settings.sim_fleet_window_seconds,
        )

    def overridden(self, fields: dict[str, str]) -> Limits:
        """These limits with the valid fields of the Redis hash applied (others ignored)."""
        changes: dict[str, Any] = {}
        for name in LIMIT_FIELDS:
            raw = fields.get(name)
            if raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                continue
            if name.endswith("_requests"):
                if value >= 0:
                    changes[name] = int(value)
            elif value > 0:
                changes[name] = value
        return replace(self, **changes) if changes else self


class SlidingWindow:
    """At most ``limit`` events per ``window_s`` on a monotonic clock (a log of admit times)."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def admit(self, now: float, limit: int, window_s: float) -> int:
        """0 if admitted (and recorded), else the whole seconds until a slot frees (>= 1)."""
        if limit <= 0:
            return 0
        times = self._times
        while times and times[0] <= now - window_s:
            times.popleft()
        if len(times) >= limit:
            # 1e-9: 30.1 + 30 - 30.1 is 30.000000000000004 in floats, which is 30 s, not 31.
            return max(1, math.ceil(times[-limit] + window_s - now - 1e-9))
        times.append(now)
        return 0


class SimLimits:
    """The limits one simulated account sees; the fleet part is shared through Redis."""

    def __init__(
        self,
        base: Limits,
        clock: Clock,
        *,
        redis: aioredis.Redis | None = None,
        key_prefix: str = "",
    ) -> None:
        self._base = base
        self._current = base
        self._clock = clock
        self._redis = redis
        self._prefix = key_prefix
        self._windows = {"history": SlidingWindow(), "resolve": SlidingWindow()}
        self._read_at = -math.inf
        self._script: Any = redis.register_script(FLEET_WINDOW_LUA) if redis is not None else None

    async def limits(self) -> Limits:
        """The current limits: settings, overridden by the Redis hash (read at most 1/s)."""
        if self._redis is None:
            return self._base
        now = time.monotonic()  # real time: how fresh the copy of a Redis hash is
        if now - self._read_at >= 1.0:
            self._read_at = now
            try:
                raw = await self._redis.hgetall(sim_key(self._prefix, "limits"))
            except Exception as exc:  # the simulator fails open: a limit is not worth a crash
                logger.warning("sim limits hash unreadable: {}", type(exc).__name__)
            else:
                fields = {text(k): text(v) for k, v in raw.items()}
                self._current = self._base.overridden(fields)
        return self._current

    async def check(self, request_class: str) -> int:
        """0 if the request may be answered, else the FLOOD_WAIT seconds to answer with."""
        if request_class not in self._windows:
            return 0
        limits = await self.limits()
        if request_class == "history":
            limit, window = limits.history_requests, limits.history_window_seconds
        else:
            limit, window = limits.resolve_requests, limits.resolve_window_seconds
        wait = self._windows[request_class].admit(self._clock.monotonic(), limit, window)
        if wait:
            return wait
        if self._script is not None and limits.fleet_requests > 0:
            try:
                result = await self._script(
                    keys=[sim_key(self._prefix, "fleet"), sim_key(self._prefix, "fleet:seq")],
                    args=[limits.fleet_requests, round(limits.fleet_window_seconds * 1000)],
                )
            except Exception as exc:
                logger.warning("sim fleet limit unavailable: {}", type(exc).__name__)
                return 0
            return int(result)
        return 0
