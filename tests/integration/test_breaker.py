"""The shared circuit breaker against a real redis-server: opening on transient failures,
refusing everything while open, exactly one half-open probe fleet-wide, closing/reopening."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from fleet.breaker import BreakerState, CircuitBreaker, Transition
from fleet.bucket import TokenBucket
from fleet.clock import SystemClock
from fleet.keys import Keys
from fleet.settings import FleetSettings
from tests.integration.procs import Procs
from worker.errors import BreakerOpen
from worker.fleet_gate import FleetGate

GateFactory = Callable[[str, FleetSettings], FleetGate]


@pytest.fixture
async def gates(redis_client: aioredis.Redis) -> AsyncIterator[GateFactory]:
    """Gates closed after the test, before its Redis client is: a gate left open keeps its hold
    listener reconnecting to a client the test closed."""
    made: list[FleetGate] = []

    def make(session: str, s: FleetSettings) -> FleetGate:
        made.append(FleetGate(redis_client, Keys(), session, s, SystemClock()))
        return made[-1]

    yield make
    for gate in made:
        await gate.aclose()


def settings(**overrides: Any) -> FleetSettings:
    base: dict[str, Any] = {
        "circuit_breaker_failure_threshold": 5,
        "circuit_breaker_window_seconds": 30,
        "circuit_breaker_open_timeout_seconds": 60,
    }
    return FleetSettings(_env_file=None, **{**base, **overrides})


async def redis_now(client: aioredis.Redis) -> float:
    sec, usec = await client.time()
    return int(sec) + int(usec) / 1e6


async def test_threshold_failures_open_the_breaker_and_one_caller_sees_the_transition(
    redis_client: aioredis.Redis,
) -> None:
    breaker = CircuitBreaker(redis_client, Keys(), settings())
    for _ in range(4):
        status = await breaker.record_failure()
        assert (status.state, status.transition) == (BreakerState.CLOSED, None)
    results = await asyncio.gather(*(breaker.record_failure() for _ in range(20)))
    assert [r.transition for r in results].count(Transition.OPENED) == 1
    assert all(r.state == BreakerState.OPEN for r in results)
    assert (await breaker.status()).retry_after_s == pytest.approx(60, abs=1)


async def test_failures_older_than_the_window_do_not_count(redis_client: aioredis.Redis) -> None:
    breaker = CircuitBreaker(redis_client, Keys(), settings(circuit_breaker_window_seconds=0.3))
    for _ in range(4):
        await breaker.record_failure()
    await asyncio.sleep(0.35)  # the window is measured on Redis TIME: these four age out
    for _ in range(4):
        assert (await breaker.record_failure()).state == BreakerState.CLOSED
    assert (await breaker.record_failure()).transition == Transition.OPENED


async def test_while_open_no_acquire_is_admitted(
    redis_client: aioredis.Redis, gates: GateFactory
) -> None:
    s = settings(circuit_breaker_failure_threshold=1)
    bucket = TokenBucket(redis_client, Keys(), s)
    breaker = CircuitBreaker(redis_client, Keys(), s)
    assert (await breaker.record_failure()).transition == Transition.OPENED
    results = await asyncio.gather(
        *(bucket.acquire(f"s{i % 10}", "history", probe_token=f"t{i}") for i in range(100))
    )
    assert sum(r.admitted for r in results) == 0
    assert {r.reason for r in results} == {"breaker"}
    assert all(55 < r.wait_s <= 60 for r in results)
    gate = gates("alice", s)
    refused = 0
    for _ in range(20):
        with pytest.raises(BreakerOpen) as exc:
            await gate.acquire("other")
        refused += 1
        assert exc.value.retry_after > 55
    assert refused == 20
    counters = await bucket.counters()
    assert counters.get("history:admits") == counters.get("other:admits") == 0
    assert counters.get("history:refused") == 100


async def test_exactly_one_half_open_probe_fleet_wide_with_four_processes_racing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    s = settings(circuit_breaker_failure_threshold=1, circuit_breaker_open_timeout_seconds=0.5)
    configs = [
        {
            "url": redis_url,
            "prefix": "",
            "session": f"w{i}",
            "cls": "history",
            "mode": "probe",
            "barrier": "t:barrier",
            "settings": {"circuit_breaker_probe_lease_seconds": 30},
        }
        for i in range(4)
    ]
    # The processes learn the open period from Redis once released (they start first).
    procs = Procs(configs)
    try:
        for _ in configs:
            assert await redis_client.blpop(["t:barrier:ready"], timeout=20) is not None
        breaker = CircuitBreaker(redis_client, Keys(), s)
        opened = await breaker.record_failure()
        assert opened.transition == Transition.OPENED
        open_until = await redis_now(redis_client) + opened.retry_after_s
        await redis_client.set("t:open_until_us", int(open_until * 1e6))
        await redis_client.set("t:deadline_us", int((open_until + 0.5) * 1e6))
        await redis_client.rpush("t:barrier:go", *["go"] * len(configs))
        results = await asyncio.to_thread(procs.results)
    finally:
        procs.kill()
    counts = [r["counts"] for r in results]
    assert sum(c["probe"] for c in counts) == 1, counts
    assert sum(c["go"] for c in counts) == 0, counts
    # Every process was still asking, before and after the open period ended: a real race.
    assert all(c["refused"] > c["refused_after_open_period"] > 0 for c in counts), counts
    assert [t for r in results for t in r["transitions"]] == ["half_open"]
    status = await CircuitBreaker(redis_client, Keys(), s).status()
    assert status.state == BreakerState.HALF_OPEN
    assert (await breaker.record_success("not-the-probe")).state == BreakerState.HALF_OPEN


async def test_probe_failure_reopens_and_probe_success_closes(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(circuit_breaker_failure_threshold=1, circuit_breaker_open_timeout_seconds=0.2)
    bucket = TokenBucket(redis_client, Keys(), s)
    breaker = CircuitBreaker(redis_client, Keys(), s)
    await breaker.record_failure()
    await asyncio.sleep(0.25)  # past the 0.2 s open period (Redis TIME)
    probe = await bucket.acquire("a", "other", probe_token="p1")
    assert (probe.admitted, probe.reason, probe.transition) == (True, "probe", "half_open")
    reopened = await breaker.record_failure("p1")
    assert (reopened.state, reopened.transition) == (BreakerState.OPEN, Transition.REOPENED)
    assert not (await bucket.acquire("b", "other", probe_token="p2")).admitted
    await asyncio.sleep(0.25)
    probe = await bucket.acquire("b", "other", probe_token="p3")
    assert (probe.reason, probe.transition) == ("probe", "half_open")
    closed = await breaker.record_success("p3")
    assert (closed.state, closed.transition) == (BreakerState.CLOSED, Transition.CLOSED)
    assert (await breaker.record_success("p3")).transition is None  # logged once
    assert (await bucket.acquire("c", "other")).reason == "ok"


async def test_an_abandoned_probe_lease_expires_and_another_probe_goes(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(
        circuit_breaker_failure_threshold=1,
        circuit_breaker_open_timeout_seconds=0.1,
        circuit_breaker_probe_lease_seconds=0.2,
    )
    bucket = TokenBucket(redis_client, Keys(), s)
    await CircuitBreaker(redis_client, Keys(), s).record_failure()
    await asyncio.sleep(0.15)
    assert (await bucket.acquire("a", "other", probe_token="dead")).reason == "probe"
    refused = await bucket.acquire("b", "other", probe_token="x")
    assert not refused.admitted and 0 < refused.wait_s <= 0.2
    await asyncio.sleep(0.25)  # the holder died without reporting: its lease runs out
    again = await bucket.acquire("b", "other", probe_token="y")
    assert (again.reason, again.transition) == ("probe", None)


async def test_late_failures_of_other_requests_while_open_are_ignored(
    redis_client: aioredis.Redis,
) -> None:
    breaker = CircuitBreaker(redis_client, Keys(), settings(circuit_breaker_failure_threshold=1))
    first = await breaker.record_failure()
    late = await breaker.record_failure()
    assert (late.state, late.transition) == (BreakerState.OPEN, None)
    assert late.retry_after_s <= first.retry_after_s
    assert (await breaker.reset()).transition == Transition.CLOSED


async def test_flood_waits_never_open_the_breaker_but_transient_failures_do(
    redis_client: aioredis.Redis, gates: GateFactory
) -> None:
    s = settings(circuit_breaker_failure_threshold=2, flood_wait_jitter_seconds=0)
    gate = gates("alice", s)
    for _ in range(5):
        await gate.report("history", "flood", flood_wait_s=0.01)
    assert (await gate.breaker.status()).state == BreakerState.CLOSED
    await gate.report("other", "transient")
    await gate.report("other", "transient")
    assert (await gate.breaker.status()).state == BreakerState.OPEN
    with pytest.raises(BreakerOpen):
        await gate.acquire("other")


async def test_gate_reports_the_probe_outcome_and_only_the_probe_closes(
    redis_client: aioredis.Redis, gates: GateFactory
) -> None:
    s = settings(circuit_breaker_failure_threshold=1, circuit_breaker_open_timeout_seconds=0.1)
    probe_gate = gates("alice", s)
    other_gate = gates("bob", s)
    await other_gate.report("other", "transient")
    await asyncio.sleep(0.15)
    await probe_gate.acquire("other")  # the probe
    with pytest.raises(BreakerOpen):
        await other_gate.acquire("other")
    await other_gate.report("other", "ok")  # not the probe: no effect
    await other_gate.report("other", "transient")  # a late failure: no effect
    assert (await probe_gate.breaker.status()).state == BreakerState.HALF_OPEN
    await probe_gate.report("other", "ok")
    assert (await probe_gate.breaker.status()).state == BreakerState.CLOSED
    await other_gate.acquire("other")


async def test_a_gate_closes_promptly_after_its_breaker_opened(
    redis_client: aioredis.Redis,
) -> None:
    # Closed while its hold listener was still subscribing: redis-py's blocking pubsub read
    # kept the cancelled listener waiting, and the close (or the event loop's shutdown, for a
    # gate left open) hung until the test's timeout.
    s = settings(circuit_breaker_failure_threshold=2, flood_wait_jitter_seconds=0)
    gate = FleetGate(redis_client, Keys(), "alice", s, SystemClock())
    for _ in range(5):
        await gate.report("history", "flood", flood_wait_s=0.01)
    await gate.report("other", "transient")
    await gate.report("other", "transient")
    with pytest.raises(BreakerOpen):
        await gate.acquire("other")
    async with asyncio.timeout(1.0):  # 2 ms with the bounded read
        await gate.aclose()
