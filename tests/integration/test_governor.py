"""The governor's rate controller and scheduler against a real Redis (in-process)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from governor.bucket import TokenBucket
from governor.daemon import LeaderLease, RateController
from governor.keys import Keys
from governor.scheduler import Schedule, Scheduler, parse_chats, parse_daily_at
from governor.settings import GovernorSettings


def settings(**overrides: Any) -> GovernorSettings:
    base: dict[str, Any] = {
        "governor_tick_seconds": 0.2,
        "governor_lease_seconds": 1.0,
        "flood_wait_jitter_seconds": 0,
    }
    base.update(overrides)
    return GovernorSettings(_env_file=None, **base)


async def fleet_rate(client: aioredis.Redis, c: str = "history") -> float | None:
    raw = await client.hget(Keys().rates, f"fleet:{c}:rate")
    return float(raw) if raw is not None else None


async def test_a_tick_after_floods_cuts_the_fleet_rate_to_a_share_of_the_measured_rate(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(
        fleet_rate_history_per_second=200.0,
        fleet_rate_history_burst=50,
        rate_history_per_second=200.0,
    )
    bucket = TokenBucket(redis_client, Keys(), s)
    controller = RateController(bucket, s)
    assert await controller.tick() == []  # the first reading is only a baseline
    t0 = time.monotonic()
    for _ in range(20):
        assert (await bucket.acquire("alice", "history")).admitted
    await bucket.record_flood("alice", "history", 3)
    await asyncio.sleep(0.3)
    changes = await controller.tick()
    elapsed = time.monotonic() - t0
    fleet = [c for c in changes if c.scope == "fleet" and c.request_class == "history"]
    assert len(fleet) == 1 and fleet[0].decision.action == "cut"
    measured_low, measured_high = 20 / (elapsed + 0.05), 20 / max(0.01, elapsed - 0.05)
    new = await fleet_rate(redis_client)
    assert new is not None and 0.7 * measured_low <= new <= 0.7 * measured_high
    assert fleet[0].old == 200.0
    # The flooded session got its own override; the other classes were left alone.
    assert await redis_client.hget(Keys().rates, "session:alice:history:rate") is not None
    assert await fleet_rate(redis_client, "other") is None
    # A flood within the cut cooldown does not cut again.
    await bucket.record_flood("alice", "history", 3)
    assert [c for c in await controller.tick() if c.scope == "fleet"] == []


async def test_with_the_fixed_strategy_floods_change_no_rate(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(rate_limit_strategy="fixed", fleet_rate_history_per_second=200.0)
    bucket = TokenBucket(redis_client, Keys(), s)
    controller = RateController(bucket, s)
    await controller.tick()
    for _ in range(20):
        assert (await bucket.acquire("alice", "history")).admitted
    await bucket.record_flood("alice", "history", 3)
    await asyncio.sleep(0.3)
    assert await controller.tick() == []
    assert await fleet_rate(redis_client) is None  # still the configured rate


async def test_a_tick_raises_the_rate_only_while_saturated_and_quiet(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(
        fleet_rate_history_per_second=20.0,
        fleet_rate_history_burst=1,
        rate_history_per_second=100.0,
        aimd_quiet_seconds=0,
        aimd_increase_fraction=0.1,
    )
    bucket = TokenBucket(redis_client, Keys(), s)
    controller = RateController(bucket, s)
    await controller.tick()
    await asyncio.sleep(0.3)  # idle: not saturated
    assert await controller.tick() == []
    assert await fleet_rate(redis_client) is None

    async def hammer(session: str, until: float) -> None:
        while time.monotonic() < until:
            result = await bucket.acquire(session, "history")
            await asyncio.sleep(result.wait_s)

    until = time.monotonic() + 0.6
    await asyncio.gather(hammer("alice", until), hammer("bob", until))
    changes = await controller.tick()
    assert [(c.scope, c.decision.action) for c in changes] == [("fleet", "raise")]
    assert await fleet_rate(redis_client) == pytest.approx(22.0)


async def test_leader_lease_is_held_by_one_and_extended_only_by_its_holder(
    redis_client: aioredis.Redis,
) -> None:
    a = LeaderLease(redis_client, Keys(), "gov-a", 0.5)
    b = LeaderLease(redis_client, Keys(), "gov-b", 0.5)
    assert await a.hold()
    assert not await b.hold()
    assert await a.hold()  # extended
    assert not await b.release()  # not b's to release
    await asyncio.sleep(0.6)  # a stalled past its TTL
    assert await b.hold()
    assert not await a.hold()  # a never extends b's lease
    assert await b.release()
    assert await redis_client.get(Keys().governor_leader) is None


async def test_scheduled_fetch_is_pushed_once_per_chat_and_day_across_governors(
    redis_client: aioredis.Redis,
) -> None:
    schedule = Schedule(
        parse_chats("@ru_python,@golang_ru"), parse_daily_at("01:00"), ZoneInfo("UTC")
    )
    keys = Keys()
    first, failover = (
        Scheduler(redis_client, keys, schedule),
        Scheduler(redis_client, keys, schedule),
    )
    early = datetime(2025, 11, 8, 0, 30, tzinfo=UTC)
    assert await first.run_once(early) == []
    now = datetime(2025, 11, 8, 1, 0, 5, tzinfo=UTC)
    results = await asyncio.gather(*(g.run_once(now) for g in (first, failover, first)))
    assert sorted(len(r) for r in results) == [0, 0, 2]
    assert await failover.run_once(datetime(2025, 11, 8, 23, 0, tzinfo=UTC)) == []
    queued = [json.loads(x) for x in await redis_client.lrange(keys.commands, 0, -1)]
    assert [q["command_id"] for q in queued] == [
        "sched:ru_python:2025-11-08",
        "sched:golang_ru:2025-11-08",
    ]
    assert all(q["requested_by"] == "governor" and q["days"] == 1 for q in queued)
    ttl = await redis_client.ttl(keys.schedule_marker("ru_python:2025-11-08"))
    assert 0 < ttl <= 3 * 86400
    # The next day is pushed again, once.
    assert len(await failover.run_once(datetime(2025, 11, 9, 1, 0, tzinfo=UTC))) == 2
    assert await redis_client.llen(keys.commands) == 4
