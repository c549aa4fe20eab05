"""The fleet gate: the :class:`~fleet.gate.RequestGate` a worker's Telegram boundary uses.

``acquire`` is one call of the shared bucket script and at most one sleep on the injected
clock; it raises :class:`~worker.errors.BreakerOpen` while the fleet's breaker is open and
:class:`~worker.errors.RateLimited` when the wait would exceed ``FLOOD_WAIT_MAX_SECONDS`` (the
caller puts the command back instead of sleeping). ``report`` records FloodWaits in the bucket
and transient failures in the breaker; plain successes cost no Redis call unless the request
was the breaker's half-open probe.

Redis unavailable: the gate fails *closed*. It paces requests with an in-process GCRA at the
per-account default rate of each class with no burst (never an unlimited burst, never
"fail open" like Stripe's or Envoy's limiters: Telegram's quota is hidden and per account), and
tries Redis again every ``REDIS_FALLBACK_RETRY_SECONDS``, so shared control resumes well
within 2 s of Redis returning. FloodWaits seen meanwhile are honoured locally and replayed into
Redis on recovery.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loguru import logger
from redis.asyncio import Redis

from fleet.breaker import BreakerStatus, CircuitBreaker
from fleet.bucket import AcquireResult, RateDefaults, TokenBucket
from fleet.clock import Clock
from fleet.gate import Outcome, RequestClass
from fleet.keys import Keys, check_session
from fleet.redisconn import REDIS_DOWN
from fleet.scripts import scripts_for
from fleet.settings import FleetSettings
from worker.errors import BreakerOpen, RateLimited
from worker.holds import HoldListener

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

#: The ``component`` label of the shared breaker in ``breaker_state`` / ``breaker_open_total``.
BREAKER_COMPONENT = "telegram"
_TRANSITION_STATE = {
    "opened": "open",
    "reopened": "open",
    "half_open": "half_open",
    "closed": "closed",
}

# The probe token of the request the current task is making (set by acquire, read by report).
_probe: ContextVar[tuple[int, str] | None] = ContextVar("governor_probe", default=None)

Mode = Literal["shared", "local"]


@dataclass
class _PendingFlood:
    request_class: RequestClass
    until: float  # clock.monotonic()


class _LocalLimiter:
    """Reserve-style GCRA in process memory with burst 1: the fail-closed fallback."""

    def __init__(self, per_second: dict[str, float]) -> None:
        self.interval = {c: 1.0 / r for c, r in per_second.items()}
        self.tat: dict[str, float] = {}
        self.paused_until: dict[str, float] = {}

    def start(self, now: float) -> None:
        """Entering fallback: the shared bucket may just have admitted one, so wait a slot."""
        self.tat = {c: now + t for c, t in self.interval.items()}

    def wait(self, request_class: str, now: float) -> float:
        tat = max(self.tat.get(request_class, now), now)
        return max(tat, self.paused_until.get(request_class, 0.0)) - now

    def book(self, request_class: str, now: float, wait: float) -> None:
        self.tat[request_class] = now + wait + self.interval[request_class]


class FleetGate:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        session: str,
        settings: FleetSettings,
        clock: Clock,
        *,
        worker_id: str = "",
        rng: random.Random | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.session = check_session(session)
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.worker_id = worker_id or session
        self.rng = rng or random.Random()
        scripts = scripts_for(redis)
        self.bucket = TokenBucket(
            redis, keys, settings, scripts=scripts, worker_id=self.worker_id, rng=self.rng
        )
        self.breaker = CircuitBreaker(redis, keys, settings, scripts=scripts)
        defaults = RateDefaults.from_settings(settings)
        self._local = _LocalLimiter({c: r.per_second for c, r in defaults.session.items()})
        self._mode: Mode = "shared"
        self._retry_redis_at = 0.0
        self._pending: list[_PendingFlood] = []
        self.holds = HoldListener(
            redis, keys.holds_channel, retry_s=settings.redis_fallback_retry_seconds
        )
        self._log = logger.bind(worker_id=self.worker_id, session=session)

    @property
    def mode(self) -> Mode:
        """``shared`` (Redis bucket and breaker) or ``local`` (Redis unavailable: fallback)."""
        return self._mode

    # --- RequestGate ---------------------------------------------------------------------
    async def aclose(self) -> None:
        await self.holds.aclose()

    async def acquire(self, request_class: RequestClass) -> None:
        started = self.clock.monotonic()
        await self._acquire(request_class)
        if self.metrics is not None:
            self.metrics.token_wait_seconds.labels(request_class=request_class).observe(
                max(0.0, self.clock.monotonic() - started)
            )

    async def _acquire(self, request_class: RequestClass) -> None:
        self._take_probe()
        while True:
            if self._mode == "local" and self.clock.monotonic() < self._retry_redis_at:
                await self._acquire_local(request_class)
                return
            self.holds.start()
            token = f"{self.worker_id}:{uuid.uuid4().hex}"
            result = await self._book(request_class, token)
            if result is None:
                return  # Redis went away: paced locally instead
            self._admit(request_class, result, token)
            if result.wait_s <= 0:
                return
            if result.reason == "probe":
                await self.clock.sleep(result.wait_s)
                return
            if not await self.holds.sleep(self.clock, request_class, result.wait_s):
                return
            # A fleet hold was announced while this task slept on a slot booked before the
            # flood: sending then would hit the window Telegram just found full. Give the slot
            # up and book again (the bucket answers "held" until the hold ends).

    async def _book(self, request_class: RequestClass, token: str) -> AcquireResult | None:
        """One admission from the shared bucket, sleeping out pauses and holds (which are not
        booked); None if Redis is unavailable and the request was paced locally instead."""
        while True:
            try:
                async with asyncio.timeout(self.settings.redis_gate_timeout_seconds):
                    if self._pending:
                        await self._replay_floods()
                    result = await self.bucket.acquire(
                        self.session, request_class, probe_token=token
                    )
            except REDIS_DOWN as exc:
                self._enter_local(exc)
                await self._acquire_local(request_class)
                return None
            self._resume_shared()
            if (
                result.admitted
                or result.reason not in ("paused", "held")
                or not self._may_wait(result.wait_s)
            ):
                return result
            await self.clock.sleep(result.wait_s)

    def _take_probe(self) -> str:
        """The probe token this task holds through this gate ('' if none), and forget it."""
        held = _probe.get()
        if held is None or held[0] != id(self):
            return ""
        _probe.set(None)
        return held[1]

    def _may_wait(self, seconds: float) -> bool:
        return seconds <= self.settings.flood_wait_max_seconds

    async def report(
        self, request_class: RequestClass, outcome: Outcome, *, flood_wait_s: float = 0.0
    ) -> None:
        token = self._take_probe()
        if self._mode == "local" and self.clock.monotonic() < self._retry_redis_at:
            # Redis is down: honour a FloodWait locally and replay it later; the breaker
            # cannot be shared meanwhile, so transient failures go unrecorded.
            if outcome == "flood":
                until = self._pause_locally(request_class, flood_wait_s)
                self._pending.append(_PendingFlood(request_class, until))
            return
        try:
            async with asyncio.timeout(self.settings.redis_gate_timeout_seconds):
                if outcome == "flood":
                    await self._flood(request_class, flood_wait_s)
                if outcome == "transient":
                    self._log_transition(await self.breaker.record_failure(token))
                elif token:
                    # The probe got an answer from Telegram (even a flood or a fatal error
                    # says the service is up): close the breaker.
                    self._log_transition(await self.breaker.record_success(token))
        except REDIS_DOWN as exc:
            self._enter_local(exc)

    # --- shared path ---------------------------------------------------------------------
    def _admit(self, request_class: RequestClass, result: AcquireResult, token: str) -> None:
        if result.transition:
            self._log.warning(
                "circuit breaker half-open: this worker sends the probe",
                event="breaker_transition",
                transition="half_open",
            )
            self._breaker_metric("half_open")
        if not result.admitted:
            if result.reason == "breaker":
                # Opened by whichever process saw the failures: observed here, not counted.
                self._breaker_metric("open", count_open=False)
                raise BreakerOpen(
                    f"circuit breaker open; retry in {result.wait_s:.1f} s", result.wait_s
                )
            self._rate_limit_hit(result.reason)
            raise RateLimited(
                f"{request_class} requests of session {self.session} must wait "
                f"{result.wait_s:.1f} s ({result.reason}), more than FLOOD_WAIT_MAX_SECONDS",
                result.wait_s,
                request_class,
            )
        if result.reason == "probe":
            _probe.set((id(self), token))

    def _breaker_metric(self, state: str, *, count_open: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.set_breaker_state(BREAKER_COMPONENT, state, count_open=count_open)

    def _rate_limit_hit(self, reason: str) -> None:
        """A request refused by the shared bucket (``rate_limit_hits_total{source="bucket"}``)."""
        if self.metrics is not None:
            self.metrics.rate_limit_hits_total.labels(source="bucket", reason=reason).inc()

    def _pause_locally(self, request_class: RequestClass, seconds: float) -> float:
        until = self.clock.monotonic() + seconds
        self._local.paused_until[request_class] = max(
            self._local.paused_until.get(request_class, 0.0), until
        )
        return until

    async def _flood(self, request_class: RequestClass, seconds: float) -> None:
        # Honour the pause locally first, so a fallback that starts now still respects it.
        until = self._pause_locally(request_class, seconds)
        try:
            await self.bucket.record_flood(self.session, request_class, seconds)
        except REDIS_DOWN:
            self._pending.append(_PendingFlood(request_class, until))
            raise
        self._log.warning(
            "FloodWait {wait_seconds:g} s on {request_class}: session paused",
            wait_seconds=seconds,
            request_class=request_class,
            event="flood_wait_recorded",
        )

    async def _replay_floods(self) -> None:
        now = self.clock.monotonic()
        while self._pending:
            pending = self._pending[0]
            if pending.until > now:
                await self.bucket.record_flood(
                    self.session, pending.request_class, pending.until - now
                )
            self._pending.pop(0)

    def _log_transition(self, status: BreakerStatus) -> None:
        if status.transition is not None:
            self._log.warning(
                "circuit breaker {transition} (state {state})",
                transition=status.transition.value,
                state=status.state.value,
                event="breaker_transition",
            )
            self._breaker_metric(_TRANSITION_STATE.get(status.transition.value, status.state.value))

    # --- fallback ------------------------------------------------------------------------
    def _enter_local(self, exc: BaseException) -> None:
        now = self.clock.monotonic()
        self._retry_redis_at = now + self.settings.redis_fallback_retry_seconds
        if self._mode == "shared":
            self._mode = "local"
            self._local.start(now)
            self._log.error(
                "Redis unavailable ({error}); pacing requests locally at the per-account "
                "default rates until it returns",
                error=type(exc).__name__,
            )

    def _resume_shared(self) -> None:
        if self._mode == "local":
            self._mode = "shared"
            self._log.warning("Redis is back; shared rate control resumed")

    async def _acquire_local(self, request_class: RequestClass) -> None:
        now = self.clock.monotonic()
        wait = self._local.wait(request_class, now)
        if not self._may_wait(wait):
            self._rate_limit_hit("local_pause")
            raise RateLimited(
                f"{request_class} requests of session {self.session} are paused for "
                f"{wait:.1f} s, more than FLOOD_WAIT_MAX_SECONDS",
                math.ceil(wait),
                request_class,
            )
        self._local.book(request_class, now, wait)
        if wait > 0:
            await self.clock.sleep(wait)
