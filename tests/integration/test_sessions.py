"""Session leases: one holder per session, a polite wait when none is free, bad sessions."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from loguru import logger

from fleet.keys import Keys
from worker.errors import SessionRevoked
from worker.sessions import SessionLeases
from worker.settings import WorkerSettings

KEYS = Keys("")


def _settings(tmp_path: Path, **kw: object) -> WorkerSettings:
    base: dict[str, object] = {
        "telegram_backend": "telethon",
        "sessions_dir": tmp_path / "sessions",
        "session_wait_seconds": 0.1,
        "session_lease_seconds": 5,
    }
    base.update(kw)
    return WorkerSettings(**base)  # type: ignore[arg-type]


def _files(tmp_path: Path, *names: str) -> None:
    (tmp_path / "sessions").mkdir(exist_ok=True)
    for name in names:
        (tmp_path / "sessions" / f"{name}.session").write_bytes(b"")


async def test_workers_get_different_sessions_and_the_extra_one_waits_saying_why(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    _files(tmp_path, "a", "b", "c")
    s = _settings(tmp_path)
    leases = [SessionLeases(redis_client, KEYS, s) for _ in range(4)]
    stop = asyncio.Event()
    names = [await lease.claim(stop) for lease in leases[:3]]
    assert sorted(names) == ["a", "b", "c"]  # type: ignore[type-var]
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        fourth = asyncio.create_task(leases[3].claim(stop))
        await asyncio.sleep(0.35)  # several polls: the reason is logged once, not per poll
        assert not fourth.done()
        why = [line for line in lines if "no free telegram session" in line]
        assert len(why) == 1 and "3 in use" in why[0]
        await leases[1].release()
        assert await asyncio.wait_for(fourth, 5) == "b"
    finally:
        logger.remove(sink)


async def test_claim_returns_none_when_stopped_while_waiting(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    s = _settings(tmp_path, telegram_session="solo")
    first, second = SessionLeases(redis_client, KEYS, s), SessionLeases(redis_client, KEYS, s)
    stop = asyncio.Event()
    assert await first.claim(stop) == "solo"
    asyncio.get_running_loop().call_later(0.2, stop.set)
    assert await second.claim(stop) is None


async def test_refresh_detects_a_lease_taken_over(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    s = _settings(tmp_path, telegram_session="solo")
    lease = SessionLeases(redis_client, KEYS, s)
    await lease.claim(asyncio.Event())
    assert await lease.refresh()
    await redis_client.set(KEYS.session_lease("solo"), "someone-else")
    assert not await lease.refresh()


async def test_bad_session_is_skipped_until_its_file_is_renewed(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    _files(tmp_path, "a", "b")
    s = _settings(tmp_path)
    lease = SessionLeases(redis_client, KEYS, s)
    assert await lease.claim(asyncio.Event()) == "a"
    await lease.mark_bad("AUTH_KEY_UNREGISTERED", "w1")
    await lease.release()
    again = SessionLeases(redis_client, KEYS, s)
    assert await again.claim(asyncio.Event()) == "b"
    await again.release()
    path = tmp_path / "sessions" / "a.session"
    os.utime(path, (path.stat().st_mtime + 10, path.stat().st_mtime + 10))  # a new login
    assert await SessionLeases(redis_client, KEYS, s).claim(asyncio.Event()) == "a"
    assert not await redis_client.hexists(KEYS.sessions_bad, "a")


async def test_pinned_bad_session_is_fatal(redis_client: aioredis.Redis, tmp_path: Path) -> None:
    s = _settings(tmp_path, telegram_session="solo")
    lease = SessionLeases(redis_client, KEYS, s)
    await lease.claim(asyncio.Event())
    await lease.mark_bad("revoked", "w1")
    with pytest.raises(SessionRevoked, match="marked bad"):
        await SessionLeases(redis_client, KEYS, s).claim(asyncio.Event())


def test_sim_sessions_are_virtual(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.backend import backend_for

    _files(tmp_path, "real")  # session files do not count for the simulator
    s = _settings(tmp_path, telegram_backend="sim")
    leases = SessionLeases.__new__(SessionLeases)
    leases.settings = s
    monkeypatch.setenv("SIM_SESSIONS", "sim-1, sim-2")
    leases.fixed_names = backend_for(s).session_names
    assert leases.candidates() == ["sim-1", "sim-2"]
    monkeypatch.delenv("SIM_SESSIONS")
    leases.fixed_names = backend_for(s).session_names
    assert leases.candidates() == ["sim"]
