"""The reliable queue against a real Redis: take/ack, ownership-checked recovery, poison
commands, delayed retries, release on shutdown, dead letters, outages."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from fleet.deadletters import list_dead_letters, new_dead_letter, requeue_dead_letter
from fleet.keys import Keys
from fleet.recovery import recover
from fleet.redisconn import RedisLink, RedisUnavailable, connect
from tests.redis_server import free_port
from worker.queue import WorkQueue

KEYS = Keys("")


def cmd(n: int) -> bytes:
    return json.dumps(
        {
            "command": "fetch",
            "chat": f"@chat_{n:03d}",
            "mode": "date",
            "date": "2025-01-02",
            "command_id": f"c{n}",
        }
    ).encode()


async def _queue(client: aioredis.Redis, wid: str, lease_s: float = 10.0) -> WorkQueue:
    q = WorkQueue(client, KEYS, wid, lease_s=lease_s)
    assert await q.claim_lease({"session": wid}) == 2
    return q


async def test_take_moves_command_into_processing_list_and_ack_removes_it(
    redis_client: aioredis.Redis,
) -> None:
    q = await _queue(redis_client, "w1")
    await redis_client.rpush(KEYS.commands, cmd(1), cmd(2))
    raw = await q.take(0.1)
    assert raw == cmd(1)
    assert await redis_client.lrange(KEYS.processing("w1"), 0, -1) == [cmd(1)]
    assert await redis_client.llen(KEYS.commands) == 1
    assert await q.ack(raw, "c1", completed=True)
    assert await redis_client.llen(KEYS.processing("w1")) == 0
    assert await q.completed_at("c1") is not None
    assert await q.completed_at("c2") is None
    assert await q.take(0.1) == cmd(2)
    assert await q.ack(cmd(2), "c2", completed=False)
    assert await q.completed_at("c2") is None  # failed is not completed


async def test_take_returns_none_after_its_short_timeout(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "w1")
    started = time.monotonic()
    assert await q.take(0.2) is None
    assert time.monotonic() - started < 2


async def test_recovery_requeues_commands_of_a_dead_worker_at_the_head_in_order(
    redis_client: aioredis.Redis,
) -> None:
    dead = await _queue(redis_client, "dead", lease_s=0.5)
    await redis_client.rpush(KEYS.commands, cmd(1), cmd(2), cmd(3))
    assert await dead.take(0.1) == cmd(1)
    assert await dead.take(0.1) == cmd(2)
    await redis_client.rpush(KEYS.commands, cmd(4))
    # alive: nothing happens
    report = await recover(redis_client, KEYS)
    assert report.total == 0
    await redis_client.delete(KEYS.worker_lease("dead"))  # the lease expired
    report = await recover(redis_client, KEYS)
    assert report.recovered == {"dead": 2}
    assert await redis_client.lrange(KEYS.commands, 0, -1) == [cmd(1), cmd(2), cmd(3), cmd(4)]
    assert await redis_client.llen(KEYS.processing("dead")) == 0
    assert not await redis_client.hexists(KEYS.workers, "dead")
    assert await redis_client.hget(KEYS.deliveries, "c1") == b"1"


async def test_recovery_never_touches_a_live_worker(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "alive")
    await redis_client.rpush(KEYS.commands, cmd(1))
    await q.take(0.1)
    for _ in range(3):
        await recover(redis_client, KEYS, scan=True)
    assert await redis_client.lrange(KEYS.processing("alive"), 0, -1) == [cmd(1)]


async def test_recovery_finds_unregistered_processing_lists_by_scan(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.rpush(KEYS.processing("ghost"), cmd(9))
    assert (await recover(redis_client, KEYS)).total == 0
    assert (await recover(redis_client, KEYS, scan=True)).recovered == {"ghost": 1}


async def test_command_that_kills_its_worker_three_times_is_dead_lettered(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.rpush(KEYS.commands, cmd(1))
    for attempt in range(1, 4):
        q = await _queue(redis_client, f"victim{attempt}")
        assert await q.take(0.1) == cmd(1)
        await redis_client.delete(KEYS.worker_lease(f"victim{attempt}"))  # kill -9
        report = await recover(redis_client, KEYS, max_deliveries=3)
        if attempt < 3:
            assert report.recovered == {f"victim{attempt}": 1}
            assert report.dead_lettered == []
        else:
            assert report.total == 0
            [letter] = report.dead_lettered
            assert letter.command_id == "c1"
            assert letter.chat == "@chat_001"
            assert letter.payload == cmd(1)
            assert "3 times" in letter.reason
    assert await redis_client.llen(KEYS.commands) == 0
    [stored] = await list_dead_letters(redis_client, KEYS)
    assert stored.source == "recovery"
    assert not await redis_client.hexists(KEYS.deliveries, "c1")


async def test_replace_keeps_the_assigned_id_across_a_crash(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "w1")
    raw = b'{"command":"fetch","chat":"@abcd","mode":"date","date":"2025-01-01"}'
    new = b'{"command":"fetch","chat":"@abcd","mode":"date","date":"2025-01-01","command_id":"x"}'
    await redis_client.rpush(KEYS.commands, raw)
    assert await q.take(0.1) == raw
    assert await q.replace(raw, new)
    await redis_client.delete(KEYS.worker_lease("w1"))
    await recover(redis_client, KEYS)
    assert await redis_client.lrange(KEYS.commands, 0, -1) == [new]
    assert not await q.replace(raw, new)  # no longer held


async def test_retry_later_parks_the_command_until_due(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "w1")
    await redis_client.rpush(KEYS.commands, cmd(1))
    raw = await q.take(0.1)
    assert raw is not None
    assert await q.retry_later(raw, "c1", 0.3) == 1
    assert await q.retries("c1") == 1
    assert await redis_client.llen(KEYS.processing("w1")) == 0
    assert (await recover(redis_client, KEYS)).promoted == 0
    await asyncio.sleep(0.35)  # the delay itself is what is tested; Redis TIME decides
    assert (await recover(redis_client, KEYS)).promoted == 1
    assert await redis_client.lrange(KEYS.commands, 0, -1) == [cmd(1)]
    raw = await q.take(0.1)
    assert raw is not None
    await q.ack(raw, "c1", completed=True)
    assert await q.retries("c1") == 0


async def test_release_hands_everything_back_to_the_head_in_order(
    redis_client: aioredis.Redis,
) -> None:
    q = await _queue(redis_client, "w1")
    await redis_client.rpush(KEYS.commands, cmd(1), cmd(2), cmd(3))
    await q.take(0.1)
    await q.take(0.1)
    assert await q.release_all() == 2
    assert await redis_client.lrange(KEYS.commands, 0, -1) == [cmd(1), cmd(2), cmd(3)]
    assert not await redis_client.hexists(KEYS.deliveries, "c1")  # not counted: not a crash


async def test_release_is_refused_when_another_process_holds_the_lease(
    redis_client: aioredis.Redis,
) -> None:
    q = await _queue(redis_client, "w1")
    await redis_client.rpush(KEYS.commands, cmd(1))
    await q.take(0.1)
    other = WorkQueue(redis_client, KEYS, "w1")
    assert await other.claim_lease({}) == 0
    assert await other.release_all() == -1
    assert await redis_client.llen(KEYS.processing("w1")) == 1


async def test_scripts_survive_script_flush(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "w1")
    await redis_client.rpush(KEYS.commands, cmd(1))
    raw = await q.take(0.1)
    await redis_client.script_flush()
    assert raw is not None
    assert await q.ack(raw, "c1", completed=True)
    await redis_client.script_flush()
    assert (await recover(redis_client, KEYS)).total == 0


async def test_dead_letter_keeps_raw_payload_and_requeue_puts_it_back_once(
    redis_client: aioredis.Redis,
) -> None:
    q = await _queue(redis_client, "w1")
    junk = b"\xff\xfe not json"
    await redis_client.rpush(KEYS.commands, junk)
    raw = await q.take(0.1)
    assert raw == junk
    letter = new_dead_letter(
        raw,
        reason="not JSON",
        error_type="CommandRejected",
        command_id=None,
        chat=None,
        worker_id="w1",
        source="validation",
    )
    await q.dead_letter(raw, letter)
    assert await redis_client.llen(KEYS.processing("w1")) == 0
    [stored] = await list_dead_letters(redis_client, KEYS)
    assert stored.payload == junk and stored.reason == "not JSON"
    again = await requeue_dead_letter(redis_client, KEYS, stored.id)
    assert again is not None and again.id == stored.id
    assert await requeue_dead_letter(redis_client, KEYS, stored.id) is None
    assert await redis_client.lrange(KEYS.commands, 0, -1) == [junk]


async def test_huge_payload_is_dead_lettered_truncated_and_cannot_be_requeued(
    redis_client: aioredis.Redis,
) -> None:
    q = WorkQueue(redis_client, KEYS, "w1", dead_letter_payload_max_bytes=1024)
    await q.claim_lease({})
    big = b"x" * 100_000
    await redis_client.rpush(KEYS.commands, big)
    raw = await q.take(0.1)
    assert raw is not None
    letter = new_dead_letter(
        raw,
        reason="too big",
        error_type="CommandRejected",
        command_id=None,
        chat=None,
        worker_id="w1",
        source="validation",
    )
    await q.dead_letter(raw, letter)
    [stored] = await list_dead_letters(redis_client, KEYS)
    assert stored.truncated and stored.payload_bytes == 100_000
    assert stored.payload is not None and len(stored.payload) == 1024
    with pytest.raises(ValueError, match="truncated"):
        await requeue_dead_letter(redis_client, KEYS, stored.id)


async def test_lease_is_refreshed_by_its_holder_only(redis_client: aioredis.Redis) -> None:
    q = await _queue(redis_client, "w1", lease_s=5)
    assert await q.claim_lease({}) == 1
    intruder = WorkQueue(redis_client, KEYS, "w1")
    assert await intruder.claim_lease({}) == 0
    await q.drop_lease()
    assert await intruder.claim_lease({}) == 2


async def test_redis_link_gives_up_after_the_max_outage() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    link = RedisLink("redis://127.0.0.1", max_outage_s=0.6, max_wait_s=0.2)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await link.call(client.ping)
    assert 0.5 <= time.monotonic() - started < 5
    assert not link.up and link.outages == 1
    await client.aclose()


async def test_redis_link_aborts_at_once_when_told(redis_url: str) -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    abort = asyncio.Event()
    link = RedisLink("x", max_outage_s=60, abort=abort, max_wait_s=5)
    asyncio.get_running_loop().call_later(0.3, abort.set)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await link.call(client.ping)
    assert time.monotonic() - started < 3
    await client.aclose()
    good = connect(redis_url)
    assert await RedisLink("x", max_outage_s=1).call(good.ping)
    await good.aclose()
