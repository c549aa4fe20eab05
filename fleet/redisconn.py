"""The worker's Redis connection: which errors mean "Redis is down", and riding out outages.

:func:`connect` builds a client with a socket timeout above the pop timeout and no hidden
retries (redis-py's default would retry every command ten times and hide an outage).
:class:`RedisLink` wraps calls: errors in :data:`REDIS_DOWN` are retried with exponential
backoff and jitter, one log line per state change (down, back), and after
``REDIS_MAX_OUTAGE_SECONDS`` it gives up with :class:`RedisUnavailable` so the worker shuts
down gracefully instead of crash-looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions
from loguru import logger
from redis.asyncio import Redis
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

T = TypeVar("T")

#: Errors meaning "Redis cannot be reached now" (``BusyLoadingError`` is a ``ConnectionError``).
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


class RedisUnavailable(Exception):
    """Redis stayed unreachable longer than ``REDIS_MAX_OUTAGE_SECONDS`` (or we are stopping)."""


def connect(dsn: str, *, pop_timeout_s: float = 1.0) -> Redis:
    """A client for the worker: socket timeout above the pop timeout, no hidden retries.

    redis-py's default retries every command up to 10 times with backoff, which would hide an
    outage from :class:`RedisLink` (and stall a stopping worker); we retry in one place.
    ``rediss://`` URLs give TLS, ``redis://user:password@…`` gives ACL/AUTH.
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        dsn,
        socket_timeout=pop_timeout_s + 5.0,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=15,
    )


class RedisLink:
    """Runs Redis operations, riding out outages: exponential backoff with jitter, one log line
    when Redis goes away and one when it is back, and :class:`RedisUnavailable` once the outage
    has lasted ``max_outage_s`` (the caller then shuts down) or ``abort`` is set."""

    def __init__(
        self,
        display: str,
        *,
        max_outage_s: float,
        abort: asyncio.Event | None = None,
        initial_wait_s: float = 0.1,
        max_wait_s: float = 5.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.display = display
        self.max_outage_s = max_outage_s
        self.abort = abort or asyncio.Event()
        self.initial_wait_s = initial_wait_s
        self.max_wait_s = max_wait_s
        self.on_state = on_state
        self.down_since: float | None = None
        self.back_at: float | None = None
        self.outages = 0
        self._last_error = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def outage_seconds(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def exhausted(self) -> bool:
        return self.down_since is not None and self.outage_seconds() >= self.max_outage_s

    def mark_down(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            logger.warning(
                "redis {} unreachable ({}); reconnecting with backoff, giving up after {:.0f}s",
                self.display,
                self._last_error,
                self.max_outage_s,
            )
            if self.on_state:
                self.on_state(False)

    def mark_up(self) -> None:
        if self.down_since is not None:
            logger.info(
                "redis {} reachable again after {:.1f}s", self.display, self.outage_seconds()
            )
            self.down_since = None
            self.back_at = time.monotonic()
            if self.on_state:
                self.on_state(True)

    def since_back(self) -> float:
        """Seconds since the last outage ended (infinity if there was none)."""
        return float("inf") if self.back_at is None else time.monotonic() - self.back_at

    async def call(self, op: Callable[[], Awaitable[T]], what: str = "redis") -> T:
        """``await op()``, retried while Redis is down; raises :class:`RedisUnavailable`."""

        def give_up(state: RetryCallState) -> bool:
            return self.abort.is_set() or self.exhausted()

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is None:
                return
            if state.attempt_number >= 2:  # the first failure may be one stale pooled connection
                self.mark_down(exc)
            logger.debug(
                "{} failed ({}: {}); retry {}", what, type(exc).__name__, exc, state.attempt_number
            )

        backoff = wait_exponential(multiplier=self.initial_wait_s, max=self.max_wait_s) + (
            wait_random(0, self.initial_wait_s)
        )

        def wait(state: RetryCallState) -> float:
            # After a Redis restart every pooled connection fails once: retry at once, quietly.
            return 0.0 if state.attempt_number == 1 else float(backoff(state))

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(REDIS_DOWN),
            wait=wait,
            stop=give_up,
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    result = await op()
        except REDIS_DOWN as exc:
            self.mark_down(exc)
            raise RedisUnavailable(
                f"redis {self.display} unreachable for {self.outage_seconds():.0f}s: "
                f"{self._last_error}"
            ) from None
        self.mark_up()
        return result

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when ``abort`` is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.abort.wait(), timeout=seconds)
