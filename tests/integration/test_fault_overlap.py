"""Overlapping commands on one chat: a day another execution completed meanwhile is skipped.

Two executions share one data root: a range (A) and a date inside it (B). B runs to its end
while A is about to open that date, after A decided at its start that the day still had to be
fetched, which is what two workers taking both commands at once do. A must not fail: the day
is reported as skipped (and in ``files``), and every day file is exactly the world's messages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from telethon import utils

from fleet.clock import FakeClock
from worker.commands import CommandLimits, FetchCommand, day_bounds, parse_command
from worker.daywriter import DayWriter
from worker.fetch import Fetcher, FetchOutcome
from worker.sim.client import sim_client_factory
from worker.sim.settings import SimSettings
from worker.storage import DayStore
from worker.telegram import TelegramSession

NOW = datetime(2025, 11, 9, 12, 0, tzinfo=UTC)
UTCZ = ZoneInfo("UTC")
LIMITS = CommandLimits(today=NOW.date(), max_range_days=31)
SHARED = date(2025, 11, 3)


def command(**fields: Any) -> FetchCommand:
    return parse_command(json.dumps({"command": "fetch", "chat": "@ru_python", **fields}), LIMITS)


class RacingStore(DayStore):
    """A's store: the first time A opens the shared day, B's whole execution runs first (on
    the event loop, while A's thread waits), as if B had won the race for the day's lock."""

    def __init__(self, *args: Any, other: Any, loop: asyncio.AbstractEventLoop, **kw: Any):
        super().__init__(*args, **kw)
        self.other = other
        self.loop = loop
        self.raced: FetchOutcome | None = None

    def open_day(
        self, chat_key: str, chat_display: str, day: date, *, force: bool = False
    ) -> DayWriter:
        if day == SHARED and self.raced is None:
            self.raced = asyncio.run_coroutine_threadsafe(self.other(), self.loop).result(30)
        return super().open_day(chat_key, chat_display, day, force=force)


@pytest.fixture
async def sessions() -> AsyncIterator[list[TelegramSession]]:
    opened: list[TelegramSession] = []
    yield opened
    for s in opened:
        await s.close()


async def _session(clock: FakeClock, opened: list[TelegramSession]) -> TelegramSession:
    settings = SimSettings(
        telegram_backend="sim",
        sim_history_start="2025-10-01",
        sim_messages_per_day=300,
        sim_history_requests=0,
        sim_resolve_requests=0,
    )
    session = TelegramSession(
        settings, "acct", clock=clock, client_factory=sim_client_factory(settings)
    )
    await session.connect()
    opened.append(session)
    return session


@pytest.mark.parametrize("strategy", ["batch", "per_day"])
async def test_a_day_completed_by_an_overlapping_command_is_skipped_not_an_error(
    clean_env: Path, sessions: list[TelegramSession], strategy: str
) -> None:
    clock = FakeClock(NOW)
    root = clean_env / "data"
    b_store = DayStore(root, schema_version="1.0.0", timezone="UTC", clock=clock)
    b = Fetcher(await _session(clock, sessions), b_store, tz=UTCZ, clock=clock)
    a_session = await _session(clock, sessions)

    async def run_b() -> FetchOutcome:
        return await b.run(command(mode="date", date=SHARED.isoformat()))

    a_store = RacingStore(
        root,
        schema_version="1.0.0",
        timezone="UTC",
        clock=clock,
        other=run_b,
        loop=asyncio.get_running_loop(),
    )
    a = Fetcher(a_session, a_store, tz=UTCZ, clock=clock)
    rng = command(mode="range", strategy=strategy, **{"from": "2025-11-01", "to": "2025-11-06"})

    outcome = await a.run(rng)

    assert a_store.raced is not None and a_store.raced.days_completed == [SHARED]
    assert outcome.days_skipped == [SHARED] and not outcome.days_failed
    assert sorted(outcome.days_completed) == [d for d in rng.days if d != SHARED]
    assert outcome.files == sorted(
        f"data/ru_python/2025/discussions_{d.isoformat()}.json" for d in rng.days
    )
    chat = await a_session.resolve(rng.chat)
    bare, _ = utils.resolve_id(chat.peer_id)
    for day in rng.days:
        start, end = day_bounds(day, UTCZ)
        expected = [i for i, _ in a_session.client.sim.world.messages_between(bare, start, end)]
        doc = json.loads(a_store.day_path("ru_python", day).read_text())
        assert [m["id"] for m in doc["messages"]] == expected
        assert a_store.is_complete("ru_python", day)
