"""The incremental scheduler's Redis side against a real Redis: channels, the high-water mark
written by the ack, one command per chat in flight, the concurrency cap, and two governors
racing (issue 14)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from fleet.keys import Keys
from fleet.recovery import recover
from governor.channels import Channel, ChannelStore, load_channels_yaml
from governor.incremental import IncrementalScheduler, channel_report
from governor.settings import GovernorSettings
from worker.queue import WorkQueue

KEYS = Keys("")


def settings(**extra: Any) -> GovernorSettings:
    base: dict[str, Any] = {
        "feature_incremental_parsing_enabled": True,
        "parser_scheduler_interval_sec": 60,
        "parser_max_concurrency": 4,
        "parser_default_backfill_days": 3,
    }
    base.update(extra)
    return GovernorSettings(**base)


async def add(client: aioredis.Redis, *chats: str, **kw: Any) -> None:
    store = ChannelStore(client, KEYS)
    for chat in chats:
        await store.put(Channel.new(chat, **kw))


async def worker_queue(client: aioredis.Redis, wid: str) -> WorkQueue:
    q = WorkQueue(client, KEYS, wid, lease_s=30)
    assert await q.claim_lease({"session": wid}) == 2
    return q


async def take_and_complete(q: WorkQueue, mark_id: int | None) -> dict[str, Any]:
    raw = await q.take(0.5)
    assert raw is not None
    cmd = json.loads(raw)
    mark = None if mark_id is None else (cmd["command_id"].split(":")[1], mark_id, cmd["to"])
    assert await q.ack(raw, cmd["command_id"], completed=True, mark=mark)
    return dict(cmd)


def today() -> date:
    return datetime.now(UTC).date()


async def test_a_new_channel_is_backfilled_then_fetched_from_its_mark(
    redis_client: aioredis.Redis,
) -> None:
    await add(redis_client, "@alpha_chat", backfill=3, interval=1)
    sched = IncrementalScheduler(redis_client, KEYS, settings())
    first = await sched.tick()
    assert [p.mode for p in first.pushed] == ["historical"]
    cmd = first.pushed[0].command
    assert cmd["from"] == (today() - timedelta(days=3)).isoformat()
    assert cmd["to"] == today().isoformat() and cmd["after_id"] == 0
    q = await worker_queue(redis_client, "w1")
    await take_and_complete(q, mark_id=1234)
    mark = json.loads(await redis_client.hget(KEYS.hwm, "alpha_chat"))
    assert mark["id"] == 1234 and mark["day"] == today().isoformat()
    assert mark["command_id"] == "sched:alpha_chat:1"
    # Within the interval: the sweep notices the end, nothing is pushed.
    second = await sched.tick()
    assert second.finished == [("alpha_chat", "ok")] and second.pushed == []
    await asyncio.sleep(1.1)  # the channel's interval (1 s) passes
    third = await sched.tick()
    assert [p.mode for p in third.pushed] == ["incremental"]
    inc = third.pushed[0].command
    assert (inc["from"], inc["to"], inc["after_id"]) == (today().isoformat(),) * 2 + (1234,)
    assert inc["command_id"] == "sched:alpha_chat:2"


async def test_no_second_command_while_one_is_queued_held_delayed_or_recovered(
    redis_client: aioredis.Redis,
) -> None:
    await add(redis_client, "@alpha_chat", interval=1)
    sched = IncrementalScheduler(redis_client, KEYS, settings())
    assert len((await sched.tick()).pushed) == 1
    await asyncio.sleep(1.1)  # due again by time: still nothing while the command exists
    assert (await sched.tick()).pushed == []  # queued
    q = await worker_queue(redis_client, "w1")
    raw = await q.take(0.5)
    assert raw is not None
    assert (await sched.tick()).pushed == []  # held by a live worker
    cid = json.loads(raw)["command_id"]
    await q.retry_later(raw, cid, 60)
    assert (await sched.tick()).pushed == []  # delayed for a retry
    await redis_client.zrem(KEYS.delayed, raw)
    await redis_client.rpush(KEYS.processing("w1"), raw)
    await redis_client.delete(KEYS.worker_lease("w1"))  # w1 died holding it
    assert (await sched.tick()).pushed == []
    await recover(redis_client, KEYS, max_deliveries=5)
    assert await redis_client.llen(KEYS.commands) == 1
    assert (await sched.tick()).pushed == []  # back in the queue
    assert await redis_client.llen(KEYS.commands) == 1


async def test_a_failed_run_is_retried_after_a_backoff_and_reported(
    redis_client: aioredis.Redis,
) -> None:
    await add(redis_client, "@alpha_chat", interval=3600)
    sched = IncrementalScheduler(redis_client, KEYS, settings(parser_retry_max=2))
    await sched.tick()
    q = await worker_queue(redis_client, "w1")
    raw = await q.take(0.5)
    assert raw is not None
    await q.ack(raw, json.loads(raw)["command_id"], completed=False)  # failed for good
    result = await sched.tick()
    assert result.finished == [("alpha_chat", "failed")] and result.pushed == []
    assert await redis_client.hget(KEYS.hwm, "alpha_chat") is None  # a failure never marks
    report = (await channel_report(redis_client, KEYS, sched.settings))[0]
    assert report["failures"] == 1 and report["last_result"] == "failed"
    assert report["mode"] == "historical"
    # The retry is due 5 s after the failure, not an hour later.
    due = datetime.strptime(report["next_run"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert due - datetime.now(UTC) < timedelta(seconds=10)


async def test_the_concurrency_cap_and_priority_decide_who_runs_first(
    redis_client: aioredis.Redis,
) -> None:
    await add(redis_client, "@low_chat", "@mid_chat", priority=0)
    await add(redis_client, "@top_chat", priority=5)
    sched = IncrementalScheduler(redis_client, KEYS, settings(parser_max_concurrency=2))
    first = await sched.tick()
    assert [p.key for p in first.pushed] == ["top_chat", "low_chat"] and first.in_flight == 2
    assert (await sched.tick()).pushed == []
    q = await worker_queue(redis_client, "w1")
    await take_and_complete(q, mark_id=10)
    third = await sched.tick()
    assert [p.key for p in third.pushed] == ["mid_chat"]


async def test_two_governors_reading_the_same_state_push_once(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    await add(redis_client, *(f"@chat_{i:02d}" for i in range(10)))
    other = aioredis.Redis.from_url(redis_url)
    try:
        a = IncrementalScheduler(redis_client, KEYS, settings(parser_max_concurrency=100))
        b = IncrementalScheduler(other, KEYS, settings(parser_max_concurrency=100))
        push_a = a._script
        b_result: list[Any] = []

        async def b_runs_between_a_reading_and_pushing(**kw: Any) -> Any:
            b_result.append(await b.tick())  # b read the same state a read, and pushes
            q = await worker_queue(other, "w1")
            for _ in range(10):  # ... and its commands even finish before a's push lands
                await take_and_complete(q, mark_id=None)
            return await push_a(**kw)

        a._script = b_runs_between_a_reading_and_pushing  # type: ignore[assignment]
        ra = await a.tick()
        assert len(b_result[0].pushed) == 10
        assert ra.pushed == [] and len(ra.finished) == 10  # seq compare-and-set refused a's
        assert await redis_client.llen(KEYS.commands) == 0
    finally:
        await other.aclose()


async def test_a_stale_plan_does_not_push_when_the_mark_moved(
    redis_client: aioredis.Redis,
) -> None:
    await add(redis_client, "@alpha_chat")
    sched = IncrementalScheduler(redis_client, KEYS, settings())
    script = sched._script
    seen: list[int] = []

    async def mark_moves_between_read_and_push(**kw: Any) -> Any:
        if not seen:
            seen.append(1)
            await redis_client.hset(
                KEYS.hwm, "alpha_chat", json.dumps({"id": 9, "day": today().isoformat()})
            )
        return await script(**kw)

    sched._script = mark_moves_between_read_and_push  # type: ignore[assignment]
    assert (await sched.tick()).pushed == []
    again = await sched.tick()
    assert again.pushed[0].command["after_id"] == 9


async def test_the_mark_is_never_lowered_and_only_a_completion_moves_it(
    redis_client: aioredis.Redis,
) -> None:
    q = await worker_queue(redis_client, "w1")
    for raw, cid, done, mark in (
        (b"a", "c1", True, ("x_chat", 50, "2026-01-02")),
        (b"b", "c2", True, ("x_chat", 40, "2026-01-03")),  # lower id: kept at 50
        (b"c", "c3", False, ("x_chat", 90, "2026-01-04")),  # failed: no mark
        (b"d", "c4", True, ("x_chat", 50, "2026-01-05")),  # same id, later day: day moves
    ):
        await redis_client.rpush(KEYS.processing("w1"), raw)
        await q.ack(raw, cid, completed=done, mark=mark)
    mark = json.loads(await redis_client.hget(KEYS.hwm, "x_chat"))
    assert (mark["id"], mark["day"], mark["command_id"]) == (50, "2026-01-05", "c4")


def test_channels_yaml_is_read_and_a_bad_entry_is_named(tmp_path: Path) -> None:
    good = tmp_path / "channels.yaml"
    good.write_text(
        "channels:\n  - '@alpha_chat'\n  - {chat: beta_chat, backfill: full, priority: 3}\n"
    )
    chans = load_channels_yaml(good)
    assert [(c.chat, c.backfill, c.priority) for c in chans] == [
        ("@alpha_chat", 7, 0),
        ("@beta_chat", "full", 3),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- '@alpha_chat'\n- {chat: beta_chat, backfil: 3}\n")
    with pytest.raises(ValueError, match="entry 2: unknown fields"):
        load_channels_yaml(bad)
