"""One fetching worker process over the simulator, for ``bench/governor.py`` and the
cross-process governor test (``tests/integration/test_governor_crossprocess.py``).

``python bench/_bench_worker.py '<json config>'`` runs a :class:`worker.telegram.TelegramSession`
with ``TELEGRAM_BACKEND=sim`` and pages through one chat's history again and again until
``seconds`` have passed (or SIGTERM), then prints one JSON line of statistics. The gate is one of

- ``governor``: :class:`worker.fleet_gate.FleetGate` on the shared Redis bucket;
- ``telethon``: no gate; FloodWaits are slept through (N s plus jitter), as Telethon's default
  ``flood_sleep_threshold=60`` would;
- ``fixed``: a local reserve-style limiter at ``fixed_rate`` per second, no shared state.

Config keys: ``session``, ``policy``, ``seconds``, ``redis_url`` (the governor's Redis),
``prefix`` (its key prefix), ``sim_redis_url``/``sim_prefix`` (the simulator's fleet limit and
limits hash; a separate server keeps the round-trip count honest), ``request_log``,
``fixed_rate``, ``settings`` (extra settings fields, e.g. rates), ``ready_key`` (RPUSHed on
the governor's Redis once connected).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from loguru import logger  # noqa: E402

from fleet.chats import parse_chat  # noqa: E402
from fleet.clock import SystemClock  # noqa: E402
from fleet.gate import NullGate, Outcome, RequestClass, RequestGate  # noqa: E402
from worker.errors import TelegramError  # noqa: E402
from worker.sim.client import sim_client_factory  # noqa: E402
from worker.sim.settings import SimSettings  # noqa: E402
from worker.telegram import TelegramSession  # noqa: E402


class FixedGate:
    """A per-process reserve-style limiter (GCRA, burst 1): policy (b)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.tat = 0.0

    async def acquire(self, request_class: RequestClass) -> None:
        now = time.monotonic()
        at = max(now, self.tat)
        self.tat = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)

    async def report(
        self, request_class: RequestClass, outcome: Outcome, *, flood_wait_s: float = 0.0
    ) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    session = cfg["session"]
    policy = cfg.get("policy", "governor")
    settings = SimSettings(
        _env_file=None,
        telegram_backend="sim",
        redis_url=cfg["sim_redis_url"],
        redis_key_prefix=cfg.get("sim_prefix", ""),
        sim_request_log=cfg.get("request_log"),
        sim_messages_per_day=cfg.get("messages_per_day", 200),
        sim_latency_ms=cfg.get("latency_ms", 10.0),
        flood_wait_jitter_seconds=0.2,
        **cfg.get("settings", {}),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = aioredis.Redis.from_url(cfg["redis_url"])
    round_trips = 0
    acquire_ms: list[float] = []
    gate: RequestGate
    if policy == "governor":
        from fleet.keys import Keys
        from worker.fleet_gate import FleetGate

        inner = client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal round_trips
            round_trips += 1
            return await inner(*args, **kwargs)

        client.execute_command = counted  # type: ignore[method-assign]
        fleet_gate = FleetGate(
            client, Keys(cfg.get("prefix", "")), session, settings, SystemClock(), worker_id=session
        )
        bucket_acquire = fleet_gate.bucket.acquire

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await bucket_acquire(*args, **kwargs)
            finally:
                acquire_ms.append((time.perf_counter() - t0) * 1000)

        fleet_gate.bucket.acquire = timed  # type: ignore[method-assign]
        gate = fleet_gate
    elif policy == "fixed":
        gate = FixedGate(float(cfg["fixed_rate"]))
    else:
        gate = NullGate()
    telegram = TelegramSession(
        settings, session, gate=gate, client_factory=sim_client_factory(settings)
    )
    await telegram.connect()
    if cfg.get("ready_key"):
        await client.rpush(cfg["ready_key"], session)
    chat = await telegram.resolve(parse_chat(cfg.get("chat", f"@bench_{session}")))
    messages = pages = errors = 0
    t0 = time.monotonic()
    deadline = t0 + float(cfg.get("seconds", 60))
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=int(cfg.get("days", 3650)))

    async def fetch() -> None:
        nonlocal messages, pages, errors
        while not stop.is_set():
            try:
                async for page in telegram.iter_history(chat, start, end):
                    messages += len(page)
                    pages += 1
                    if stop.is_set():
                        return
            except TelegramError as exc:
                errors += 1
                logger.warning("fetch error: {}", exc)
                await asyncio.sleep(0.2)

    task = asyncio.create_task(fetch())
    with_timeout = max(0.0, deadline - time.monotonic())
    try:
        await asyncio.wait_for(stop.wait(), with_timeout)
    except TimeoutError:
        stop.set()
    elapsed = time.monotonic() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    sleeps = list(telegram.client.flood_sleeps)
    sent = telegram.client.sim.requests if hasattr(telegram.client, "sim") else {}
    await telegram.close()
    await client.aclose()
    return {
        "session": session,
        "policy": policy,
        "elapsed_s": elapsed,
        "messages": messages,
        "pages": pages,
        "errors": errors,
        "requests": sum(sent.values()),
        "floods_slept": len(sleeps),
        "flood_sleep_s": sum(sleeps),
        "round_trips": round_trips,
        "acquires": len(acquire_ms),
        "acquire_ms_p50": _pct(acquire_ms, 0.5),
        "acquire_ms_p99": _pct(acquire_ms, 0.99),
        "acquire_ms": acquire_ms if cfg.get("keep_latencies") else None,
    }


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
