"""The fleet's shared circuit breaker (closed → open → half-open), client side.

The state machine is ``lua/breaker.lua`` on one hash; ``lua/bucket.lua`` enforces it on every
acquire (refuses while open, grants exactly one half-open probe through a compare-and-set
lease). Only transient failures (timeouts, RPC 5xx, connection errors) are recorded here;
FloodWait belongs to the bucket. Every call returns the transition it made, if any, so the
process that caused a transition logs it exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio import Redis

from fleet.keys import Keys
from fleet.scripts import Scripts, scripts_for, text
from fleet.settings import FleetSettings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Transition(StrEnum):
    OPENED = "opened"
    HALF_OPEN = "half_open"
    CLOSED = "closed"
    REOPENED = "reopened"


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    state: BreakerState
    transition: Transition | None = None
    retry_after_s: float = 0.0


class CircuitBreaker:
    def __init__(
        self, redis: Redis, keys: Keys, settings: FleetSettings, *, scripts: Scripts | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts or scripts_for(redis)
        self._params = (
            settings.circuit_breaker_failure_threshold,
            int(settings.circuit_breaker_window_seconds * 1_000_000),
            int(settings.circuit_breaker_open_timeout_seconds * 1_000_000),
        )

    async def record_failure(self, probe_token: str = "") -> BreakerStatus:
        """A transient failure; pass the probe token if this request was the half-open probe."""
        return await self._call("failure", probe_token)

    async def record_success(self, probe_token: str) -> BreakerStatus:
        """The half-open probe got an answer: close. (Successes of other requests need no call.)"""
        return await self._call("success", probe_token)

    async def status(self) -> BreakerStatus:
        return await self._call("status", "")

    async def reset(self) -> BreakerStatus:
        """Close by hand (operators, tests)."""
        return await self._call("reset", "")

    async def _call(self, op: str, token: str) -> BreakerStatus:
        state, transition, retry_us = await self.scripts.breaker(
            (self.keys.breaker, self.keys.breaker_probe), (op, token, *self._params)
        )
        t = text(transition)
        return BreakerStatus(
            state=BreakerState(text(state)),
            transition=Transition(t) if t else None,
            retry_after_s=int(retry_us) / 1_000_000,
        )
