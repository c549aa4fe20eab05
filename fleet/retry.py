"""Retrying transient failures: exponential backoff with full jitter, on an injected clock.

One policy for the whole worker (seed 002): at most ``RETRY_MAX_ATTEMPTS`` attempts and
``RETRY_MAX_ELAPSED_SECONDS`` in total; the n-th wait is uniform in
``[0, min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**(n-1))]`` ("full jitter", so that many
workers failing together do not retry together). Only the exception types the caller names are
retried; ``CancelledError`` never is (a stopping worker must stop, tenacity issue seen in the
wild). Sleeping goes through a :class:`~fleet.clock.Clock`, so with a ``FakeClock`` retries are
instant and their delays are recorded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from fleet.clock import Clock, SystemClock

if TYPE_CHECKING:
    from fleet.settings import FleetSettings

T = TypeVar("T")

OnRetry = Callable[[str, str, float], None]
"""``on_retry(target, reason, delay_s)``: called before each backoff sleep (metrics hook)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    max_elapsed_s: float = 120.0
    base_s: float = 0.5
    max_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> RetryPolicy:
        return cls(
            max_attempts=settings.retry_max_attempts,
            max_elapsed_s=settings.retry_max_elapsed_seconds,
            base_s=settings.backoff_base_seconds,
            max_s=settings.backoff_max_seconds,
        )

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_s, self.base_s * 2 ** max(0, attempt - 1))


def _check_retry_on(retry_on: tuple[type[BaseException], ...]) -> None:
    if not retry_on:
        raise ValueError("retry_on must name at least one exception type")
    for exc_type in retry_on:
        if not issubclass(exc_type, Exception) or issubclass(exc_type, asyncio.CancelledError):
            raise ValueError(f"refusing to retry {exc_type.__name__}: only Exception subclasses")


class Retrier:
    """Runs an async callable under a :class:`RetryPolicy`; one instance may be shared."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.clock: Clock = clock or SystemClock()
        self.on_retry = on_retry
        self._rng = rng or random.Random()

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        retry_on: tuple[type[BaseException], ...],
        target: str = "",
    ) -> T:
        """Await ``fn()`` until it succeeds; re-raise the last error once the budget is spent."""
        _check_retry_on(retry_on)
        policy = self.policy
        clock = self.clock
        started = clock.monotonic()

        def elapsed() -> float:
            return clock.monotonic() - started

        def stop(state: RetryCallState) -> bool:
            return state.attempt_number >= policy.max_attempts or elapsed() >= policy.max_elapsed_s

        def wait(state: RetryCallState) -> float:
            delay = self._rng.uniform(0.0, policy.ceiling(state.attempt_number))
            return max(0.0, min(delay, policy.max_elapsed_s - elapsed()))

        def before_sleep(state: RetryCallState) -> None:
            if self.on_retry is None:
                return
            exc = state.outcome.exception() if state.outcome is not None else None
            reason = type(exc).__name__ if exc is not None else "unknown"
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            self.on_retry(target, reason, delay)

        async def attempt() -> T:
            # tenacity awaits only callables it recognises as coroutine functions (not lambdas).
            return await fn()

        retrying = AsyncRetrying(
            sleep=clock.sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception_type(retry_on),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(attempt)


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    policy: RetryPolicy,
    clock: Clock | None = None,
    target: str = "",
    on_retry: OnRetry | None = None,
    rng: random.Random | None = None,
) -> T:
    """One-shot form of :meth:`Retrier.call`."""
    retrier = Retrier(policy, clock=clock, on_retry=on_retry, rng=rng)
    return await retrier.call(fn, retry_on=retry_on, target=target)
