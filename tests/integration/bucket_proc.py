"""A worker-like process for the multi-process bucket, breaker and gate tests.

Run as ``python -m tests.integration.bucket_proc '<json config>'``; prints one JSON line.
Config: ``url``, ``prefix``, ``session``, ``cls``, ``mode`` (``admits`` | ``probe`` |
``latency``), ``count``, ``settings`` (FleetSettings overrides), ``barrier`` (key prefix:
the process pushes to ``<barrier>:ready`` and pops ``<barrier>:go``), ``stamp_key``,
``skew_s`` (moves this process's clocks, to prove the scripts
do not read them).
"""

from __future__ import annotations

import json
import sys
import time

CONFIG = json.loads(sys.argv[1])
SKEW = float(CONFIG.get("skew_s", 0.0))
if SKEW:
    # A host whose clock is off: every clock this process reads is moved, before anything
    # (asyncio, redis-py) reads one.
    _time, _time_ns, _mono = time.time, time.time_ns, time.monotonic
    time.time = lambda: _time() + SKEW
    time.time_ns = lambda: _time_ns() + int(SKEW * 1e9)
    time.monotonic = lambda: _mono() + SKEW

import asyncio  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import redis.asyncio as aioredis  # noqa: E402

from fleet.bucket import TokenBucket  # noqa: E402
from fleet.clock import SystemClock  # noqa: E402
from fleet.keys import Keys  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402
from worker.fleet_gate import FleetGate  # noqa: E402

# The "Telegram server" of the test: it stamps each request it receives with its own clock.
STAMP = "local t = redis.call('TIME') return redis.call('RPUSH', KEYS[1], t[1] * 1000000 + t[2])"


async def redis_now_us(client: aioredis.Redis) -> int:
    sec, usec = await client.time()
    return int(sec) * 1_000_000 + int(usec)


async def barrier(client: aioredis.Redis, name: str) -> None:
    """Say ready, then block until the test says go (see ``tests/integration/procs.py``)."""
    await client.rpush(f"{name}:ready", CONFIG["session"])
    await client.blpop([f"{name}:go"], timeout=30)


async def admits(client: aioredis.Redis, bucket: TokenBucket) -> dict[str, Any]:
    stamp = client.register_script(STAMP)
    booked: list[float] = []
    skew = time.time() - (await redis_now_us(client)) / 1e6
    await barrier(client, CONFIG["barrier"])
    for _ in range(CONFIG["count"]):
        result = await bucket.acquire(CONFIG["session"], CONFIG["cls"])
        assert result.admitted, result
        booked.append(result.send_at_s)
        await asyncio.sleep(result.wait_s)
        await stamp([CONFIG["stamp_key"]])
    return {"booked": booked, "skew_s": skew}


async def probe(client: aioredis.Redis, bucket: TokenBucket) -> dict[str, Any]:
    counts = {"go": 0, "probe": 0, "refused": 0, "refused_after_open_period": 0}
    transitions: list[str] = []
    await barrier(client, CONFIG["barrier"])
    # The test opens the breaker while we wait at the barrier, then publishes its times.
    open_until = int(await client.get("t:open_until_us") or 0)
    deadline = int(await client.get("t:deadline_us") or 0)
    while True:
        now = await redis_now_us(client)
        if now > deadline:
            break
        token = f"{CONFIG['session']}:{uuid.uuid4().hex}"
        result = await bucket.acquire(CONFIG["session"], CONFIG["cls"], probe_token=token)
        if result.transition:
            transitions.append(result.transition)
        if not result.admitted:
            counts["refused"] += 1
            counts["refused_after_open_period"] += now > open_until
        elif result.reason == "probe":
            counts["probe"] += 1  # and never report: the probe stays in flight
        else:
            counts["go"] += 1
        await asyncio.sleep(0.001)
    return {"counts": counts, "transitions": transitions}


async def latency(client: aioredis.Redis, settings: FleetSettings) -> dict[str, Any]:
    gate = FleetGate(client, Keys(CONFIG["prefix"]), CONFIG["session"], settings, SystemClock())
    await gate.acquire(CONFIG["cls"])  # connect and load the script before measuring
    await barrier(client, CONFIG["barrier"])
    out: list[float] = []
    for _ in range(CONFIG["count"]):
        t0 = time.perf_counter()
        await gate.acquire(CONFIG["cls"])
        out.append(time.perf_counter() - t0)
        await gate.report(CONFIG["cls"], "ok")
    return {"latencies_s": out, "mode": gate.mode}


async def main() -> None:
    settings = FleetSettings(_env_file=None, **CONFIG.get("settings", {}))
    client = aioredis.Redis.from_url(CONFIG["url"])
    try:
        bucket = TokenBucket(client, Keys(CONFIG["prefix"]), settings)
        if CONFIG["mode"] == "admits":
            result = await admits(client, bucket)
        elif CONFIG["mode"] == "probe":
            result = await probe(client, bucket)
        else:
            result = await latency(client, settings)
    finally:
        await client.aclose()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
