"""The shared adaptive token bucket: the client side every worker (and the governor) uses.

One :meth:`TokenBucket.acquire` is one ``EVALSHA`` of ``lua/bucket.lua``: it takes a token
from the session's bucket and the fleet's bucket of the request class, honours the breaker and
any FloodWait pause, and books the slot, so the caller sleeps the returned wait once. Rates
live in Redis (``rates``) so the governor can change them while workers run; a missing rate
means the worker's configured default, so a fleet without a governor keeps working.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis
from redis.typing import EncodableT

from fleet.gate import REQUEST_CLASSES, RequestClass
from fleet.keys import Keys, check_class, check_session
from fleet.scripts import Scripts, scripts_for, text
from fleet.settings import FleetSettings

#: Two sessions flooding the same request class within this long of each other is evidence that
#: they share the limit (a fleet-wide one): only then does a flood hold the class fleet-wide.
#: A full shared window refuses every session sending into it, so their floods come within a
#: few requests' time of each other; floods of two accounts' own limits coincide only by chance.
#: A lone account's flood belongs to its own limit and pauses only that account.
SHARED_FLOOD_WINDOW_S = 0.5
#: Each session's admits of each class are logged this long (``keys.window_log``): long enough
#: for a window-type limit the governor learns (Telegram's are up to a minute or so).
WINDOW_LOG_SECONDS = 90.0
WINDOW_LOG_US = int(WINDOW_LOG_SECONDS * 1_000_000)

Reason = Literal["ok", "session", "fleet", "paused", "held", "probe", "breaker"]


@dataclass(frozen=True, slots=True)
class ClassRate:
    """A GCRA bucket: ``per_second`` sustained, ``burst`` at once from idle."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not self.per_second > 0 or self.burst < 1:
            raise ValueError(f"a rate needs per_second > 0 and burst >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class RateDefaults:
    """The configured rates per request class, per account and fleet-wide."""

    session: Mapping[str, ClassRate]
    fleet: Mapping[str, ClassRate]

    @classmethod
    def from_settings(cls, s: FleetSettings) -> RateDefaults:
        return cls(
            session={
                "history": ClassRate(s.rate_history_per_second, s.rate_history_burst),
                "resolve": ClassRate(s.rate_resolve_per_second, s.rate_resolve_burst),
                "other": ClassRate(s.rate_other_per_second, s.rate_other_burst),
            },
            fleet={
                "history": ClassRate(s.fleet_rate_history_per_second, s.fleet_rate_history_burst),
                "resolve": ClassRate(s.fleet_rate_resolve_per_second, s.fleet_rate_resolve_burst),
                "other": ClassRate(s.fleet_rate_other_per_second, s.fleet_rate_other_burst),
            },
        )


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What the bucket answered.

    ``admitted``: the slot is booked; send after sleeping ``wait_s``. Otherwise nothing was
    booked and ``wait_s`` says when asking again makes sense. ``reason`` names what the wait
    (or refusal) was for; ``probe`` means this request is the breaker's half-open probe.
    ``transition`` is a breaker transition this call made (log it once).
    """

    wait_s: float
    reason: Reason
    admitted: bool = True
    transition: str | None = None
    send_at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class FloodEvent:
    at_s: float
    session: str
    request_class: str
    seconds: float
    worker: str


@dataclass(frozen=True, slots=True)
class Counters:
    """The counters hash with the Redis time it was read at (the governor diffs two reads)."""

    at_s: float
    values: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> int:
        return self.values.get(name, 0)


class TokenBucket:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: FleetSettings,
        *,
        scripts: Scripts | None = None,
        worker_id: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.defaults = RateDefaults.from_settings(settings)
        self.scripts = scripts or scripts_for(redis)
        self.worker_id = worker_id
        self.rng = rng or random.Random()
        self.probe_lease_ms = int(settings.circuit_breaker_probe_lease_seconds * 1000)
        self.max_wait_us = int(settings.flood_wait_max_seconds * 1_000_000)
        self.rate_limit_hits = 0
        self.shared_flood_window_s = SHARED_FLOOD_WINDOW_S
        # ARGV[3:7] of bucket.lua per class: the same strings every call, so build them once.
        self._argv: dict[str, tuple[str, ...]] = {
            c: (
                repr(self.defaults.session[c].per_second),
                str(self.defaults.session[c].burst),
                repr(self.defaults.fleet[c].per_second),
                str(self.defaults.fleet[c].burst),
            )
            for c in REQUEST_CLASSES
        }

    # --- the hot path --------------------------------------------------------------------
    async def acquire(
        self, session: str, request_class: RequestClass, *, probe_token: str = ""
    ) -> AcquireResult:
        """Book one request of ``request_class`` for ``session`` (one Redis round trip)."""
        k = self.keys
        keys = (
            k.session_bucket(session, request_class),
            k.fleet_bucket(request_class),
            k.pause(session, request_class),
            k.rates,
            k.counters,
            k.breaker,
            k.breaker_probe,
            k.fleet_hold(request_class),
            k.window_log(session, request_class),
        )
        args: tuple[EncodableT, ...] = (
            session,
            request_class,
            *self._argv[request_class],
            self.max_wait_us,
            probe_token,
            self.probe_lease_ms,
            WINDOW_LOG_US,
        )
        admitted, wait_us, reason, transition, send_at_us = await self.scripts.bucket(keys, args)
        return AcquireResult(
            wait_s=int(wait_us) / 1_000_000,
            reason=text(reason),  # type: ignore[arg-type]
            admitted=bool(int(admitted)),
            transition=text(transition) or None,
            send_at_s=int(send_at_us) / 1_000_000,
        )

    # --- floods and pauses ---------------------------------------------------------------
    async def record_flood(
        self, session: str, request_class: RequestClass, seconds: float
    ) -> float:
        """Telegram said FLOOD_WAIT_N: pause that session+class N s plus jitter, record it, and,
        if another session flooded the class within ``SHARED_FLOOD_WINDOW_S`` (the limit is
        shared), hold the whole class fleet-wide for min(N, ``FLOOD_FLEET_HOLD_SECONDS``).

        Returns the pause now in force, in seconds (an existing longer pause is kept).
        """
        self.rate_limit_hits += 1
        jitter = self.rng.uniform(0.0, self.settings.flood_wait_jitter_seconds)
        hold = min(max(0.0, seconds), self.settings.flood_fleet_hold_seconds)
        return await self._pause(
            session, request_class, max(0.0, seconds) + jitter, seconds, hold_s=hold
        )

    async def pause(self, session: str, request_class: RequestClass, seconds: float) -> float:
        """Pause a session+class for ``seconds`` (<= 0 lifts the pause); not counted as flood."""
        return await self._pause(session, request_class, seconds, None)

    async def _pause(
        self,
        session: str,
        request_class: str,
        seconds: float,
        flood_s: float | None,
        *,
        hold_s: float = 0.0,
    ) -> float:
        keys = (
            self.keys.pause(session, request_class),
            self.keys.floods,
            self.keys.counters,
            self.keys.fleet_hold(request_class),
            self.keys.flooded(request_class),
        )
        args: tuple[EncodableT, ...] = (
            session,
            request_class,
            math.ceil(seconds * 1000) if seconds > 0 else 0,
            "" if flood_s is None else f"{flood_s:g}",
            "0" if flood_s is None else "1",
            self.settings.flood_events_max,
            self.worker_id,
            math.ceil(hold_s * 1000),
            self.keys.holds_channel,
            round(self.shared_flood_window_s * 1000),
        )
        remaining_us = await self.scripts.flood(keys, args)
        return int(remaining_us) / 1_000_000

    # --- rates (the governor's side) -----------------------------------------------------
    async def set_rate(
        self,
        request_class: RequestClass,
        per_second: float,
        burst: int | None = None,
        *,
        scope: str = "fleet",
    ) -> None:
        """Set the current rate of one class: ``scope`` is ``fleet``, ``session`` (every
        session's bucket) or ``session:<name>`` (one session's override)."""
        check_class(request_class)
        ClassRate(per_second, burst or 1)  # validates
        mapping: dict[EncodableT, EncodableT] = {
            _field(scope, request_class, "rate"): repr(float(per_second))
        }
        if burst is not None:
            mapping[_field(scope, request_class, "burst")] = str(int(burst))
        await self.redis.hset(self.keys.rates, mapping=mapping)

    async def set_window(
        self, session: str, request_class: RequestClass, requests: int, seconds: float
    ) -> None:
        """Replace one session's own bucket of a class by a window: at most ``requests`` per
        ``seconds`` (sliding, bursts allowed), as learned from that account's FloodWaits."""
        check_class(request_class)
        if requests < 1 or not 0 < seconds <= WINDOW_LOG_SECONDS:
            raise ValueError(f"a window needs requests >= 1 and 0 < seconds <= "
                             f"{WINDOW_LOG_SECONDS:g}, got {requests} per {seconds}")  # fmt: skip
        field_name = _field(f"session:{check_session(session)}", request_class, "window")
        value = f"{int(requests)} {math.ceil(seconds * 1_000_000)}"
        await self.redis.hset(self.keys.rates, field_name, value)

    async def clear_rates(self) -> None:
        """Forget every runtime rate: back to each worker's configured defaults."""
        await self.redis.delete(self.keys.rates)

    async def publish_configured(self) -> None:
        """Write the configured defaults to ``rates:configured`` (for status)."""
        mapping: dict[EncodableT, EncodableT] = {}
        for scope, table in (("session", self.defaults.session), ("fleet", self.defaults.fleet)):
            for c, rate in table.items():
                mapping[_field(scope, c, "rate")] = repr(rate.per_second)
                mapping[_field(scope, c, "burst")] = str(rate.burst)
        await self.redis.hset(self.keys.rates_configured, mapping=mapping)

    async def rates(self) -> dict[str, dict[str, ClassRate]]:
        """The rates in force for the ``fleet`` and shared ``session`` buckets, per class."""
        raw = _decode_map(await self.redis.hgetall(self.keys.rates))
        out: dict[str, dict[str, ClassRate]] = {}
        for scope, table in (("fleet", self.defaults.fleet), ("session", self.defaults.session)):
            out[scope] = {}
            for c, default in table.items():
                rate = raw.get(_field(scope, c, "rate"))
                burst = raw.get(_field(scope, c, "burst"))
                out[scope][c] = ClassRate(
                    float(rate) if rate else default.per_second,
                    int(burst) if burst else default.burst,
                )
        return out

    # --- what the governor and status read -----------------------------------------------
    async def counters(self) -> Counters:
        """The counters with the Redis time, read atomically (MULTI).

        Besides the stored counters, ``<cls>:sent`` is ``<cls>:admits`` minus the slots the
        fleet bucket has booked ahead of now (its TAT − now, in intervals): requests admitted
        but not sent yet. A rate measured on it is what Telegram saw, not what was booked.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.hgetall(self.keys.counters)
            for c in REQUEST_CLASSES:
                pipe.get(self.keys.fleet_bucket(c))
            (sec, usec), raw, *tats = await pipe.execute()
        now_us = int(sec) * 1_000_000 + int(usec)
        values = {k: int(v) for k, v in _decode_map(raw).items()}
        for c, tat in zip(REQUEST_CLASSES, tats, strict=True):
            values[f"{c}:sent"] = values.get(f"{c}:admits", 0) - _booked_ahead(tat, now_us)
        return Counters(at_s=now_us / 1_000_000, values=values)

    async def recent_floods(self, count: int = 20) -> list[FloodEvent]:
        """The newest ``count`` FloodWait events, newest first."""
        out: list[FloodEvent] = []
        entries = await self.redis.xrevrange(self.keys.floods, count=count) or []
        for entry_id, fields in entries:
            f = _decode_map(fields or {})
            out.append(
                FloodEvent(
                    at_s=int(text(entry_id).split("-")[0]) / 1000,
                    session=f.get("session", ""),
                    request_class=f.get("class", ""),
                    seconds=float(f.get("seconds") or 0),
                    worker=f.get("worker", ""),
                )
            )
        return out

    async def snapshot(self) -> dict[str, Any]:
        """Rates, tokens left per bucket, pauses in force, counters and recent floods."""
        sec, usec = await self.redis.time()
        now_us = int(sec) * 1_000_000 + int(usec)
        rates = await self.rates()
        overrides = _decode_map(await self.redis.hgetall(self.keys.rates))
        buckets: dict[str, float] = {}
        async for raw_key in self.redis.scan_iter(match=self.keys.bucket_pattern, count=200):
            key = text(raw_key)
            tat = await self.redis.get(key)
            if tat is None:
                continue
            # bucket:fleet:<cls> | bucket:session:<session>:<cls>
            parts = key[len(self.keys.base) :].split(":")
            c = parts[-1]
            if parts[1] == "fleet":
                rate = rates["fleet"][c]
            else:
                rate = rates["session"][c]
                own = overrides.get(_field(f"session:{parts[2]}", c, "rate"))
                own_burst = overrides.get(_field(f"session:{parts[2]}", c, "burst"))
                if own:
                    rate = ClassRate(float(own), int(own_burst) if own_burst else rate.burst)
            backlog_s = max(0, int(text(tat).split()[0]) - now_us) / 1_000_000
            buckets[":".join(parts[1:])] = round(rate.burst - backlog_s * rate.per_second, 3)
        pauses: dict[str, float] = {}
        async for raw_key in self.redis.scan_iter(match=self.keys.pause_pattern, count=200):
            key = text(raw_key)
            until = await self.redis.get(key)
            if until is not None and int(text(until)) > now_us:
                name = key[len(self.keys.base) + len("pause:") :]
                pauses[name] = round((int(text(until)) - now_us) / 1_000_000, 3)
        holds: dict[str, float] = {}
        for c in REQUEST_CLASSES:
            until = await self.redis.get(self.keys.fleet_hold(c))
            if until is not None and int(text(until)) > now_us:
                holds[c] = round((int(text(until)) - now_us) / 1_000_000, 3)
        counters = await self.counters()
        return {
            "redis_time_s": now_us / 1_000_000,
            "rates": {
                scope: {c: asdict(r) for c, r in table.items()} for scope, table in rates.items()
            },
            "rate_overrides": overrides,
            "tokens": dict(sorted(buckets.items())),
            "pauses_s": dict(sorted(pauses.items())),
            "holds_s": holds,
            "counters": counters.values,
            "recent_floods": [asdict(e) for e in await self.recent_floods(10)],
        }


def parse_window(value: str) -> tuple[int, float] | None:
    """A session window as :meth:`TokenBucket.set_window` writes it (``"<K> <W µs>"``): (K, W
    seconds), or None for a value ``bucket.lua`` ignores (the same pattern and bounds)."""
    match = re.fullmatch(r"(\d+) (\d+)", value)
    if match is None:
        return None
    k, w_us = int(match[1]), int(match[2])
    return (k, w_us / 1_000_000) if k > 0 and w_us > 0 else None


def _field(scope: str, request_class: str, what: str) -> str:
    if scope not in ("fleet", "session"):
        if not scope.startswith("session:"):
            raise ValueError(f"scope is fleet, session or session:<name>, got {scope!r}")
        check_session(scope.removeprefix("session:"))
    return f"{scope}:{request_class}:{what}"


def _booked_ahead(raw: Any, now_us: int) -> int:
    """Slots a bucket (``"<TAT µs> <interval µs>"``) has booked after ``now_us``."""
    if raw is None:
        return 0
    try:
        tat, interval = text(raw).split()
        ahead = (int(tat) - now_us) / float(interval)
    except ValueError:
        return 0
    return max(0, math.floor(ahead))


def _decode_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}
