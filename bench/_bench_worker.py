"""One fetching worker process over the simulator, for ``bench/governor.py`` and the
cross-process governor test (``tests/integration/test_governor_crossprocess.py``).

``python bench/_bench_worker.py '<json config>'`` pages through one chat's history again and
again until ``seconds`` have passed (or SIGTERM), then prints one JSON line of statistics. The
policy is one of

- ``governor``: this project's worker: :class:`worker.telegram.TelegramSession` (the gated
  client) with :class:`worker.fleet_gate.FleetGate` on the shared Redis bucket;
- ``telethon``: plain Telethon exactly as a script uses it: a ``TelegramClient`` with its
  defaults (``flood_sleep_threshold=60``, ``request_retries=5``: a FloodWait of N <= 60 s is
  slept for exactly N s inside ``_call`` and the request re-sent) and ``iter_messages`` with
  ``wait_time=0``;
- ``telethon_paged``: the same with Telethon's own default page pause (``iter_messages``
  without a limit sleeps until 1 s has passed since the previous page);
- ``fixed``: the same plain Telethon client behind a per-process reserve-style limiter at
  ``fixed_rate`` per second (no shared state), as a script with its own limiter would be.

The baselines run the real Telethon request path (``_call``, its flood bookkeeping and
sleeping, ``iter_messages``) over the simulator's fake sender, the same one the governor's
client uses; only the client class differs. Worker-seconds lost to FloodWaits are counted where
they are slept: Telethon's ``asyncio.sleep`` in ``telethon.client.users`` (its flood sleeps; the
page pause lives elsewhere), and for the governor the gated client's own flood sleeps plus the
time the gate waited on a pause or a fleet hold (``held_s``: what a flood imposes on others).

Config keys: ``session``, ``policy``, ``seconds``, ``redis_url`` (the governor's Redis),
``prefix`` (its key prefix), ``sim_redis_url``/``sim_prefix`` (the simulator's fleet limit and
limits hash; a separate server keeps the round-trip count honest), ``request_log``,
``fixed_rate``, ``settings`` (extra settings fields, e.g. rates or this account's
``sim_history_requests``), ``ready_key`` (RPUSHed on the governor's Redis once connected),
``go_key`` (optional: BLPOPed after that; the run starts when it yields).
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
import telethon.client.users as telethon_users  # noqa: E402
from loguru import logger  # noqa: E402
from telethon import TelegramClient, utils  # noqa: E402
from telethon.sessions import MemorySession  # noqa: E402
from telethon.tl import functions, types  # noqa: E402

from fleet.chats import parse_chat  # noqa: E402
from fleet.clock import SystemClock  # noqa: E402
from worker.errors import TelegramError  # noqa: E402
from worker.sim.client import SimSender, sim_client_factory  # noqa: E402
from worker.sim.server import SimServer  # noqa: E402
from worker.sim.settings import SimSettings  # noqa: E402
from worker.telegram import TelegramSession  # noqa: E402

BASELINES = ("telethon", "telethon_paged", "fixed")


class _SleepLedger:
    """Stands in for the ``asyncio`` module inside ``telethon.client.users`` only: every
    ``asyncio.sleep`` there is a flood sleep (exactly N s, or the rest of a known FloodWait);
    it is counted and then slept unchanged."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.slept.append(float(delay))
        return await asyncio.sleep(delay, result)


class PlainTelethonClient(TelegramClient):  # type: ignore[misc]
    """Telethon's ``TelegramClient`` with its defaults, over the simulator's fake sender."""

    def __init__(self, settings: SimSettings, session_name: str, fixed_rate: float = 0.0) -> None:
        super().__init__(MemorySession(), 1, "sim", receive_updates=False)
        self.sim = SimServer(settings, session_name, SystemClock())
        self.interval = 1.0 / fixed_rate if fixed_rate > 0 else 0.0
        self.tat = 0.0

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()  # Telethon's _call checks the loop
        await self.sim.open()
        self._sender = SimSender(self.sim)

    def is_connected(self) -> bool:
        return True

    async def disconnect(self) -> None:
        await self._sender.disconnect()
        await self.sim.close()

    async def __call__(
        self, request: Any, ordered: bool = False, flood_sleep_threshold: int | None = None
    ) -> Any:
        if self.interval:
            # A reserve-style limiter (GCRA, burst 1) in front of every call, as a script would
            # put it; Telethon's own retries after a FloodWait happen inside the call.
            now = time.monotonic()
            at = max(now, self.tat)
            self.tat = at + self.interval
            if at > now:
                await asyncio.sleep(at - now)
        return await super().__call__(request, ordered, flood_sleep_threshold)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_baseline(
    cfg: dict[str, Any], settings: SimSettings, stop: asyncio.Event, client: aioredis.Redis
) -> dict[str, Any]:
    session = cfg["session"]
    policy = cfg["policy"]
    ledger = _SleepLedger()
    telethon_users.asyncio = ledger  # type: ignore[attr-defined]
    tg = PlainTelethonClient(
        settings, session, float(cfg.get("fixed_rate") or 0) if policy == "fixed" else 0.0
    )
    await tg.connect()
    await _ready(cfg, client, session)
    username = str(parse_chat(cfg.get("chat", f"@bench_{session}")).lookup)
    messages = pages = errors = 0
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=int(cfg.get("days", 3650)))
    wait_time = None if policy == "telethon_paged" else 0

    async def fetch() -> None:
        nonlocal messages, pages, errors
        peer: Any = None
        while not stop.is_set():
            try:
                if peer is None:
                    found = await tg(functions.contacts.ResolveUsernameRequest(username=username))
                    peer = utils.get_input_peer(found.chats[0])
                count = 0
                async for msg in tg.iter_messages(
                    peer, reverse=True, offset_date=start, limit=None, wait_time=wait_time
                ):
                    if isinstance(msg, types.MessageEmpty):
                        continue
                    if msg.date >= end:
                        break
                    messages += 1
                    count += 1
                    if count % 100 == 0:
                        pages += 1
                    if stop.is_set():
                        return
            except Exception as exc:  # Telethon gives up after request_retries FloodWaits
                errors += 1
                logger.warning("fetch error: {}", type(exc).__name__)
                await asyncio.sleep(0.2)

    t0 = time.monotonic()
    elapsed = await _run_until(cfg, stop, fetch)
    sent = tg.sim.requests
    await tg.disconnect()
    return {
        "session": session,
        "policy": policy,
        "elapsed_s": elapsed or time.monotonic() - t0,
        "messages": messages,
        "pages": pages,
        "errors": errors,
        "requests": sum(sent.values()),
        "floods_slept": len(ledger.slept),
        "flood_sleep_s": sum(ledger.slept),
        "held_s": 0.0,
        "round_trips": 0,
        "acquires": 0,
        "acquire_ms_p50": None,
        "acquire_ms_p99": None,
        "acquire_ms": None,
    }


async def _ready(cfg: dict[str, Any], client: aioredis.Redis, session: str) -> None:
    """Say "ready" (RPUSH ``ready_key``), then wait for one "go" (BLPOP ``go_key``), so that
    every worker of every policy in a side-by-side run starts at the same moment."""
    if cfg.get("ready_key"):
        await client.rpush(cfg["ready_key"], session)
    if cfg.get("go_key"):
        while await client.blpop([cfg["go_key"]], timeout=1) is None:
            pass


async def _run_until(cfg: dict[str, Any], stop: asyncio.Event, fetch: Any) -> float:
    t0 = time.monotonic()
    deadline = t0 + float(cfg.get("seconds", 60))
    task = asyncio.create_task(fetch())
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        stop.set()
    elapsed = time.monotonic() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return elapsed


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
        **cfg.get("settings", {}),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = aioredis.Redis.from_url(cfg["redis_url"])
    if policy in BASELINES:
        try:
            return await run_baseline(cfg, settings, stop, client)
        finally:
            await client.aclose()
    if policy != "governor":
        raise SystemExit(f"unknown policy {policy!r}")
    round_trips = 0
    acquire_ms: list[float] = []
    held_s = 0.0
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
        nonlocal held_s
        t0 = time.perf_counter()
        try:
            result = await bucket_acquire(*args, **kwargs)
        finally:
            acquire_ms.append((time.perf_counter() - t0) * 1000)
        if not result.admitted and result.reason in ("paused", "held"):
            # The gate sleeps this out before asking again: time lost to a FloodWait (its
            # own pause, or a fleet hold another session's flood imposed).
            held_s += result.wait_s
        return result

    fleet_gate.bucket.acquire = timed  # type: ignore[method-assign]
    telegram = TelegramSession(
        settings, session, gate=fleet_gate, client_factory=sim_client_factory(settings)
    )
    await telegram.connect()
    await _ready(cfg, client, session)
    chat = await telegram.resolve(parse_chat(cfg.get("chat", f"@bench_{session}")))
    messages = pages = errors = 0
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

    elapsed = await _run_until(cfg, stop, fetch)
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
        "held_s": held_s,
        "round_trips": round_trips,
        "acquires": len(acquire_ms),
        "acquire_ms_p50": _pct(acquire_ms, 0.5),
        "acquire_ms_p99": _pct(acquire_ms, 0.99),
        "acquire_ms": acquire_ms if cfg.get("keep_latencies") else None,
    }


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
