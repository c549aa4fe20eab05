"""The simulator's fleet-wide limit on a real Redis, its runtime override, and the request log."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from telethon import errors
from telethon.tl import functions, types

from fleet.clock import FakeClock
from worker.sim.client import sim_client_factory
from worker.sim.limits import sim_key
from worker.sim.server import SimServer
from worker.sim.settings import SimSettings

NOW = datetime(2025, 11, 9, 12, 0, tzinfo=UTC)


def settings(redis_url: str | None, **kw: Any) -> SimSettings:
    values: dict[str, Any] = {
        "telegram_backend": "sim",
        "redis_url": redis_url,
        "redis_key_prefix": "t1:",
        "sim_history_start": "2025-10-01",
        "sim_history_requests": 0,
        "sim_resolve_requests": 0,
        "sim_fleet_requests": 5,
        "sim_fleet_window_seconds": 30,
    }
    values.update(kw)
    return SimSettings(**values)


def history_request(server: SimServer) -> functions.messages.GetHistoryRequest:
    chat = server.world.chat_by_username("fleet_chat")
    assert chat is not None
    return functions.messages.GetHistoryRequest(
        peer=types.InputPeerChannel(chat.id, chat.access_hash),
        offset_id=0,
        offset_date=None,
        add_offset=0,
        limit=10,
        max_id=0,
        min_id=0,
        hash=0,
    )


async def outcomes(server: SimServer, n: int) -> list[int]:
    """0 for an answer, N for FLOOD_WAIT_N."""
    out = []
    for _ in range(n):
        try:
            await server.serve(history_request(server))
            out.append(0)
        except errors.FloodWaitError as exc:
            out.append(exc.seconds)
    return out


@pytest.fixture
async def servers(clean_env: object, redis_url: str) -> Any:
    opened: list[SimServer] = []

    async def make(name: str, **kw: Any) -> SimServer:
        server = SimServer(settings(redis_url, **kw), name, FakeClock(NOW))
        await server.open()
        opened.append(server)
        return server

    yield make
    for server in opened:
        await server.close()


async def test_fleet_limit_is_shared_by_two_accounts_through_redis(servers: Any) -> None:
    a = await servers("acct_a")
    b = await servers("acct_b")
    assert await outcomes(a, 3) == [0, 0, 0]
    got = await outcomes(b, 3)
    assert got[:2] == [0, 0]
    assert 29 <= got[2] <= 30  # the fleet window (30 s) frees in ~30 s
    flood = await outcomes(a, 1)
    assert flood[0] >= 29


async def test_fleet_limit_follows_the_redis_hash_at_runtime(
    servers: Any, redis_client: aioredis.Redis
) -> None:
    await redis_client.hset(sim_key("t1:", "limits"), mapping={"fleet_requests": 2})
    a = await servers("acct_a", sim_fleet_requests=0)  # off in settings, on through the hash
    got = await outcomes(a, 3)
    assert got[:2] == [0, 0] and got[2] >= 1
    keys = {k.decode() for k in await redis_client.keys("*")}
    assert keys <= {sim_key("t1:", n) for n in ("limits", "fleet", "fleet:seq")}


async def test_per_account_limit_is_per_session_and_ignores_redis(servers: Any) -> None:
    a = await servers("acct_a", sim_fleet_requests=0, sim_history_requests=30)
    b = await servers("acct_b", sim_fleet_requests=0, sim_history_requests=30)
    got = await outcomes(a, 31)
    assert got[:30] == [0] * 30 and got[30] == 30  # the 31st in 30 s gets FLOOD_WAIT
    assert await outcomes(b, 1) == [0]


async def test_request_log_has_one_json_line_per_request(clean_env: Path) -> None:
    log = clean_env / "logs" / "sim.jsonl"
    server = SimServer(
        settings(None, sim_history_requests=2, sim_request_log=log), "acct_log", FakeClock(NOW)
    )
    await server.open()
    try:
        assert await outcomes(server, 3) == [0, 0, 30]
        with pytest.raises(errors.UsernameNotOccupiedError):
            await server.serve(functions.contacts.ResolveUsernameRequest(username="missing_x"))
    finally:
        await server.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["method"], x["outcome"], x["flood_wait"]) for x in lines] == [
        ("messages.GetHistory", "ok", 0),
        ("messages.GetHistory", "ok", 0),
        ("messages.GetHistory", "flood", 30),
        ("contacts.ResolveUsername", "USERNAME_NOT_OCCUPIED", 0),
    ]
    assert all(x["session"] == "acct_log" and isinstance(x["ts"], float) for x in lines)


async def test_fleet_limit_reaches_a_second_worker_as_rate_limited(
    clean_env: object, redis_url: str
) -> None:
    from fleet.chats import parse_chat
    from worker.errors import RateLimited
    from worker.telegram import TelegramSession

    kw: dict[str, Any] = {"sim_fleet_requests": 3, "flood_wait_max_seconds": 0}
    s = settings(redis_url, **kw)
    one = TelegramSession(s, "w1", clock=FakeClock(NOW), client_factory=sim_client_factory(s))
    two = TelegramSession(s, "w2", clock=FakeClock(NOW), client_factory=sim_client_factory(s))
    async with one, two:
        await one.resolve(parse_chat("@fleet_chat"))  # resolves count too: 1 of 3
        chat = await two.resolve(parse_chat("@fleet_chat"))  # 2 of 3
        start = datetime(2025, 11, 1, tzinfo=UTC)
        async for _ in two.iter_history(chat, start, NOW):  # 3 of 3
            break
        with pytest.raises(RateLimited) as info:
            await one.resolve(parse_chat("@other_chat"))
        assert info.value.request_class == "resolve" and info.value.retry_after >= 29
