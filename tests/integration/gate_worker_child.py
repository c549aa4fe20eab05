"""One fetching worker process for the cross-process governor test: a
:class:`worker.telegram.TelegramSession` on the simulator behind a
:class:`worker.fleet_gate.FleetGate` on the shared Redis bucket, paging through one chat's
history again and again until ``seconds`` pass or SIGTERM.

``python tests/integration/gate_worker_child.py '<json config>'``; config keys: ``session``,
``seconds``, ``redis_url`` (the shared bucket's Redis), ``sim_redis_url``/``sim_prefix`` (the
simulator's limits), ``request_log``, ``latency_ms``, ``settings`` (extra settings fields, e.g.
rates), ``ready_key`` (RPUSHed once connected). The test reads the simulator's request log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger

from fleet.chats import parse_chat
from fleet.clock import SystemClock
from fleet.keys import Keys
from fleet.redisconn import connect
from worker.errors import TelegramError
from worker.fleet_gate import FleetGate
from worker.sim.client import sim_client_factory
from worker.sim.settings import SimSettings
from worker.telegram import TelegramSession


async def main(cfg: dict[str, Any]) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    session = cfg["session"]
    settings = SimSettings(
        _env_file=None,
        telegram_backend="sim",
        redis_url=cfg["sim_redis_url"],
        redis_key_prefix=cfg.get("sim_prefix", ""),
        sim_request_log=cfg.get("request_log"),
        sim_latency_ms=cfg.get("latency_ms", 10.0),
        flood_wait_jitter_seconds=0.2,
        **cfg.get("settings", {}),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = connect(cfg["redis_url"])
    gate = FleetGate(client, Keys(), session, settings, SystemClock(), worker_id=session)
    telegram = TelegramSession(
        settings, session, gate=gate, client_factory=sim_client_factory(settings)
    )
    await telegram.connect()
    if cfg.get("ready_key"):
        await client.rpush(cfg["ready_key"], session)
    chat = await telegram.resolve(parse_chat(f"@bench_{session}"))
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=3650)

    async def fetch() -> None:
        while not stop.is_set():
            try:
                async for _page in telegram.iter_history(chat, start, end):
                    if stop.is_set():
                        return
            except TelegramError as exc:
                logger.warning("fetch error: {}", exc)
                await asyncio.sleep(0.2)

    task = asyncio.create_task(fetch())
    try:
        await asyncio.wait_for(stop.wait(), float(cfg.get("seconds", 60)))
    except TimeoutError:
        stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await telegram.close()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
