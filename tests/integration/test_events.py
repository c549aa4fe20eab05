"""Events: exactly the CONTRACT §4 fields, published on tg_events and kept in a capped stream;
publishing never raises and gives up within its budget when Redis is gone."""

from __future__ import annotations

import asyncio
import json
import re
import time

import redis.asyncio as aioredis

from fleet.events import ALWAYS_FIELDS, EventPublisher, ProgressThrottle, make_event
from fleet.keys import Keys
from fleet.redisconn import connect
from tests.redis_server import free_port

KEYS = Keys("")
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _event(kind: str, **extra: object) -> dict[str, object]:
    return make_event(
        kind,  # type: ignore[arg-type]
        command_id="c1",
        chat="@ru_python",
        mode="date",
        params={"date": "2025-11-07"},
        worker_id="w1",
        processed=271,
        duration_sec=3.14159,
        **extra,  # type: ignore[arg-type]
    )


def test_every_event_has_the_contract_fields_and_only_the_kind_specific_extras() -> None:
    started = _event("started")
    assert tuple(started) == ALWAYS_FIELDS
    assert started["service"] == "telegram-fetcher" and started["status"] == "running"
    assert TS.fullmatch(str(started["ts"]))
    completed = _event("completed", files=["ru_python/2025/discussions_2025-11-07.json"])
    assert set(completed) == {*ALWAYS_FIELDS, "files"} and completed["status"] == "ok"
    failed = _event("failed", error_type="TransientError", error_message="boom", retryable=True)
    assert set(failed) == {*ALWAYS_FIELDS, "error", "retryable"}
    assert failed["error"] == {"type": "TransientError", "message": "boom"}
    assert failed["retryable"] is True and failed["status"] == "error"
    assert _event("progress")["duration_sec"] == 3.142


async def test_events_are_published_on_the_channel_and_appended_to_the_stream(
    redis_client: aioredis.Redis,
) -> None:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(KEYS.events_channel)
    await pubsub.get_message(timeout=1)  # subscribe confirmation
    publisher = EventPublisher(redis_client, KEYS)
    assert await publisher.publish(_event("started"))
    message = None
    deadline = time.monotonic() + 5
    while message is None and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert message is not None and json.loads(message["data"])["event"] == "started"
    [(_id, fields)] = await redis_client.xrange(KEYS.events_stream)
    assert json.loads(fields[b"event"])["command_id"] == "c1"
    await pubsub.aclose()


async def test_stream_is_capped(redis_client: aioredis.Redis) -> None:
    publisher = EventPublisher(redis_client, KEYS, stream_maxlen=100)
    for _ in range(1000):
        await publisher.publish(_event("progress"))
    assert await redis_client.xlen(KEYS.events_stream) < 300  # MAXLEN ~: approximately


async def test_publish_gives_up_without_raising_when_redis_is_gone() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    publisher = EventPublisher(client, KEYS, max_elapsed_s=0.5, max_wait_s=0.1)
    started = time.monotonic()
    assert await publisher.publish(_event("completed")) is False
    assert time.monotonic() - started < 3
    assert publisher.given_up == 1
    await client.aclose()


async def test_progress_is_throttled_and_never_waits_for_redis(
    redis_client: aioredis.Redis,
) -> None:
    publisher = EventPublisher(redis_client, KEYS)
    throttle = ProgressThrottle(publisher, interval_s=60)
    for _ in range(50):
        throttle.offer(_event("progress"))
    await throttle.drain()
    assert await redis_client.xlen(KEYS.events_stream) == 1
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    slow = ProgressThrottle(EventPublisher(dead, KEYS, max_elapsed_s=0.3), interval_s=0)
    started = time.monotonic()
    slow.offer(_event("progress"))  # returns at once; the send runs in the background
    assert time.monotonic() - started < 0.1
    await slow.drain(timeout_s=5)
    await asyncio.sleep(0)
    await dead.aclose()
