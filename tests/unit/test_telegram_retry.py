"""fleet.retry: full-jitter backoff on an injected clock, explicit exception list."""

from __future__ import annotations

import asyncio
import random

import pytest

from fleet.clock import FakeClock
from fleet.retry import RetryPolicy, retry_async

POLICY = RetryPolicy(max_attempts=5, max_elapsed_s=120.0, base_s=0.5, max_s=4.0)


class Flaky:
    def __init__(self, failures: int, exc: BaseException | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc or ConnectionError("down")

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


async def test_transient_failures_are_retried_instantly_on_a_fake_clock() -> None:
    clock = FakeClock()
    flaky = Flaky(failures=3)
    seen: list[tuple[str, str, float]] = []
    result = await retry_async(
        flaky,
        retry_on=(ConnectionError,),
        policy=POLICY,
        clock=clock,
        target="history",
        on_retry=lambda target, reason, delay: seen.append((target, reason, delay)),
        rng=random.Random(1),
    )
    assert result == "ok"
    assert flaky.calls == 4
    assert len(clock.sleeps) == 3
    assert [(t, r) for t, r, _ in seen] == [("history", "ConnectionError")] * 3
    assert [d for _, _, d in seen] == clock.sleeps


async def test_delays_are_full_jitter_under_the_exponential_ceiling() -> None:
    clock = FakeClock()
    with pytest.raises(ConnectionError):
        await retry_async(
            Flaky(failures=100),
            retry_on=(ConnectionError,),
            policy=RetryPolicy(max_attempts=8, max_elapsed_s=1000, base_s=0.5, max_s=4.0),
            clock=clock,
            rng=random.Random(7),
        )
    assert len(clock.sleeps) == 7
    for attempt, delay in enumerate(clock.sleeps, start=1):
        assert 0.0 <= delay <= min(4.0, 0.5 * 2 ** (attempt - 1))


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    flaky = Flaky(failures=100)
    with pytest.raises(ConnectionError, match="down"):
        await retry_async(flaky, retry_on=(ConnectionError,), policy=POLICY, clock=FakeClock())
    assert flaky.calls == POLICY.max_attempts


async def test_gives_up_when_the_elapsed_budget_is_spent() -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=1000, max_elapsed_s=10.0, base_s=5.0, max_s=5.0)
    flaky = Flaky(failures=10_000)
    with pytest.raises(ConnectionError):
        await retry_async(flaky, retry_on=(ConnectionError,), policy=policy, clock=clock)
    assert clock.monotonic() <= 10.0 + 1e-9  # the last wait is cut to the remaining budget
    assert flaky.calls < 1000


async def test_other_errors_are_not_retried() -> None:
    flaky = Flaky(failures=1, exc=KeyError("x"))
    with pytest.raises(KeyError):
        await retry_async(flaky, retry_on=(ConnectionError,), policy=POLICY, clock=FakeClock())
    assert flaky.calls == 1


async def test_cancellation_is_never_retried() -> None:
    flaky = Flaky(failures=1, exc=asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry_async(flaky, retry_on=(Exception,), policy=POLICY, clock=FakeClock())
    assert flaky.calls == 1


async def test_refuses_to_be_told_to_retry_cancellation() -> None:
    with pytest.raises(ValueError, match="CancelledError"):
        await retry_async(
            Flaky(0), retry_on=(asyncio.CancelledError,), policy=POLICY, clock=FakeClock()
        )


def test_policy_from_settings(clean_env: object) -> None:
    from worker.settings import WorkerSettings

    settings = WorkerSettings(
        retry_max_attempts=3,
        retry_max_elapsed_seconds=9,
        backoff_base_seconds=0.25,
        backoff_max_seconds=2,
    )
    policy = RetryPolicy.from_settings(settings)
    assert policy == RetryPolicy(max_attempts=3, max_elapsed_s=9, base_s=0.25, max_s=2)
    assert [policy.ceiling(n) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
