"""The fleet's one Redis client factory, its one "Redis is down", and its one outage tracker.

Every process and CLI (worker, governor, ops and governor CLIs, demo, simulator) builds its
client with :func:`connect` (or :func:`connect_sync` for the synchronous demo), so they share
one option set:

- ``socket_timeout``: the longest server-side block the caller issues (``BLMOVE``,
  ``XREAD BLOCK``) plus :data:`SOCKET_SLACK_S`, so a blocking read never times out early but
  a dead server is noticed within seconds;
- ``socket_connect_timeout``: :data:`CONNECT_TIMEOUT_S` (a caller may lower it, never raise it);
- ``health_check_interval``: :data:`HEALTH_CHECK_INTERVAL_S`: a pooled connection idle that
  long is PINGed before use, so a half-open socket fails fast instead of hanging;
- no hidden retries (redis-py's default retries every command with backoff, which would hide
  an outage and stall a stopping process): callers retry in one place, :class:`RedisLink`;
- TLS with a ``rediss://`` URL and ACL/AUTH with ``redis://user:password@…`` (both from
  ``REDIS_URL`` or ``REDIS_USERNAME``/``REDIS_PASSWORD``), nothing else to configure.

:data:`REDIS_DOWN` is what "Redis cannot be reached now" means everywhere. :class:`RedisLink`
tracks outages (one log line per state change: down, back) and wraps calls: errors in
:data:`REDIS_DOWN` are retried with exponential backoff and jitter, and after
``REDIS_MAX_OUTAGE_SECONDS`` it gives up with :class:`RedisUnavailable` so the process shuts
down gracefully instead of crash-looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.exceptions
from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry
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


#: Added to the caller's longest server-side block to get the socket (read) timeout.
SOCKET_SLACK_S = 5.0
#: The longest a TCP (and TLS) connect may take.
CONNECT_TIMEOUT_S = 5.0
#: Idle seconds after which a pooled connection is PINGed before it is used again.
HEALTH_CHECK_INTERVAL_S = 15


def _options(block_s: float, connect_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": max(0.0, block_s) + SOCKET_SLACK_S,
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, connect_timeout_s),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }


def connect(
    dsn: str, *, pop_timeout_s: float = 1.0, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> Redis:
    """The asyncio client every fleet process uses (see the module docstring for the options).

    ``pop_timeout_s`` is the longest server-side block this caller issues (the worker's
    ``COMMAND_POP_TIMEOUT_SECONDS``, the governor's tick for ``XREAD BLOCK``).
    """
    return Redis.from_url(
        dsn, retry=Retry(NoBackoff(), 0), **_options(pop_timeout_s, connect_timeout_s)
    )


def connect_sync(
    dsn: str, *, pop_timeout_s: float = 1.0, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> redis.Redis:
    """The same client, synchronous (for ``python -m worker demo``, which runs no event loop)."""
    return redis.Redis.from_url(
        dsn, retry=SyncRetry(NoBackoff(), 0), **_options(pop_timeout_s, connect_timeout_s)
    )


class RedisLink:
    """The one outage tracker: runs Redis operations, riding out outages (exponential backoff
    with jitter), one log line when Redis goes away and one when it is back, and
    :class:`RedisUnavailable` once the outage has lasted ``max_outage_s`` (the caller then
    shuts down) or ``abort`` is set. A loop that cannot be wrapped in :meth:`call` (the
    governor's tick) reports to it with :meth:`mark_down` / :meth:`mark_up` and asks
    :meth:`exhausted`."""

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
