"""The split scripts against a real Redis: atomic split, parts counted once, one close."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from fleet.keys import Keys
from fleet.scripts import scripts_for
from worker.queue import WorkQueue

KEYS = Keys("")
DAYS = ["2025-11-01", "2025-11-02", "2025-11-03"]


async def split(client: aioredis.Redis, q: WorkQueue, parent: bytes) -> Any:
    base = KEYS.split("p1")
    args: list[Any] = [parent, "p1", "@x_chat", "range", '{"from":"2025-11-01"}', 1000, DAYS[-1]]
    for day in DAYS:
        args += [day, json.dumps({"command_id": f"part-{day}", "part_of": "p1", "date": day})]
    return await scripts_for(client).split(
        keys=[q.processing, KEYS.commands, base, base + ":pending", KEYS.running], args=args
    )


async def done(client: aioredis.Redis, q: WorkQueue, day: str, ok: bool = True) -> Any:
    base = KEYS.split("p1")
    raw = json.dumps({"command_id": f"part-{day}", "part_of": "p1", "date": day}).encode()
    await client.rpush(q.processing, raw)
    keys = [q.processing, KEYS.completed, KEYS.deliveries, KEYS.retries, KEYS.running]
    keys += [base, base + ":pending", base + ":files", base + ":failed"]
    reply = await scripts_for(client).part_done(
        keys=keys,
        args=[raw, f"part-{day}", day, "1" if ok else "0", 10, 0, 7 + DAYS.index(day),
              json.dumps([f"x/{day}.json"]), "" if ok else "PermanentError: nope", "0", 10**9],
    )  # fmt: skip
    flat = [x.decode() for x in reply[1]]
    return int(reply[0]), dict(zip(flat[::2], flat[1::2], strict=True)), raw


async def test_a_split_replaces_the_parent_by_its_parts_atomically_and_once(
    redis_client: aioredis.Redis,
) -> None:
    q = WorkQueue(redis_client, KEYS, "w1")
    parent = b'{"command_id":"p1"}'
    await redis_client.rpush(q.processing, parent)
    await redis_client.hset(KEYS.running, "p1", "w1")
    assert await split(redis_client, q, parent) == 1
    assert await redis_client.llen(q.processing) == 0
    assert await redis_client.llen(KEYS.commands) == 3
    assert not await redis_client.hexists(KEYS.running, "p1")
    await redis_client.rpush(q.processing, parent)  # the same parent pushed again
    assert await split(redis_client, q, parent) == 0  # dropped, nothing pushed twice
    assert await redis_client.llen(KEYS.commands) == 3
    assert await redis_client.llen(q.processing) == 0


async def test_parts_are_counted_once_and_the_last_one_closes_the_parent(
    redis_client: aioredis.Redis,
) -> None:
    q = WorkQueue(redis_client, KEYS, "w1")
    await redis_client.rpush(q.processing, b"parent")
    await split(redis_client, q, b"parent")
    state, rec, _ = await done(redis_client, q, DAYS[0])
    assert (state, rec["done"], rec["processed"]) == (1, "1", "10")
    state, rec, _ = await done(redis_client, q, DAYS[0])  # re-run after a kill: not recounted
    assert (state, rec["done"], rec["processed"]) == (1, "1", "10")
    await done(redis_client, q, DAYS[1])
    state, rec, last = await done(redis_client, q, DAYS[2])
    assert state == 2 and rec["processed"] == "30" and rec["max_id"] == "9"
    assert json.loads(rec["files"]) == [f"x/{d}.json" for d in DAYS]
    assert json.loads(rec["failed"]) == {}
    assert await redis_client.lpos(q.processing, last) is not None  # acked only by the close
    base = KEYS.split("p1")
    await scripts_for(redis_client).split_close(
        keys=[q.processing, KEYS.completed, KEYS.deliveries, KEYS.retries, KEYS.running,
              base, base + ":pending", base + ":files", base + ":failed", KEYS.hwm],
        args=[last, f"part-{DAYS[2]}", "p1", "1", 10**9, "x_chat", 9, DAYS[-1]],
    )  # fmt: skip
    assert await redis_client.zscore(KEYS.completed, "p1") is not None
    assert await redis_client.llen(q.processing) == 0
    assert not await redis_client.keys(KEYS.split("*"))
    mark = json.loads(await redis_client.hget(KEYS.hwm, "x_chat"))
    assert (mark["id"], mark["day"], mark["command_id"]) == (9, DAYS[-1], "p1")
    # A part that runs after the close adds nothing and is simply acknowledged.
    state, _, raw = await done(redis_client, q, DAYS[1])
    assert state == 0 and await redis_client.lpos(q.processing, raw) is None


async def test_a_failed_day_is_reported_and_never_marks(redis_client: aioredis.Redis) -> None:
    q = WorkQueue(redis_client, KEYS, "w1")
    await redis_client.rpush(q.processing, b"parent")
    await split(redis_client, q, b"parent")
    await done(redis_client, q, DAYS[0])
    await done(redis_client, q, DAYS[1], ok=False)
    state, rec, last = await done(redis_client, q, DAYS[2])
    assert state == 2 and json.loads(rec["failed"]) == {DAYS[1]: "PermanentError: nope"}
    base = KEYS.split("p1")
    await scripts_for(redis_client).split_close(
        keys=[q.processing, KEYS.completed, KEYS.deliveries, KEYS.retries, KEYS.running,
              base, base + ":pending", base + ":files", base + ":failed", KEYS.hwm],
        args=[last, f"part-{DAYS[2]}", "p1", "0", 10**9, "", 0, DAYS[-1]],
    )  # fmt: skip
    assert await redis_client.zscore(KEYS.completed, "p1") is None
    assert await redis_client.hlen(KEYS.hwm) == 0
    assert not await redis_client.keys(KEYS.split("*"))
