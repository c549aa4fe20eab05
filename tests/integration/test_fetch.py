"""The fetch orchestrator end to end: simulator below the real Telethon client → day files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema  # type: ignore[import-untyped]
import pytest
from telethon import utils

from fleet.clock import FakeClock
from worker.commands import CommandLimits, FetchCommand, day_bounds, parse_command
from worker.errors import RateLimited
from worker.fetch import Fetcher, FetchOutcome
from worker.sim.client import sim_client_factory
from worker.sim.settings import SimSettings
from worker.storage import DayStore
from worker.telegram import TelegramSession

NOW = datetime(2025, 11, 9, 12, 0, tzinfo=UTC)
UTCZ = ZoneInfo("UTC")
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "worker/schemas/day_file.schema.json").read_text()
)
LIMITS = CommandLimits(today=NOW.date(), max_range_days=31)


def command(**fields: Any) -> FetchCommand:
    base: dict[str, Any] = {"command": "fetch", "chat": "@ru_python"}
    base.update(fields)
    return parse_command(json.dumps(base), LIMITS)


def week(strategy: str = "batch", **extra: Any) -> FetchCommand:
    return command(
        mode="range", strategy=strategy, **{"from": "2025-11-01", "to": "2025-11-07"}, **extra
    )


Env = Callable[..., Any]


@pytest.fixture
async def env(clean_env: Path) -> AsyncIterator[Env]:
    sessions: list[TelegramSession] = []

    async def make(
        data: str = "data",
        *,
        clock: FakeClock | None = None,
        stop: asyncio.Event | None = None,
        concurrency: int = 1,
        **overrides: Any,
    ) -> tuple[Fetcher, TelegramSession, DayStore, FakeClock]:
        clock = clock or FakeClock(NOW)
        values: dict[str, Any] = {
            "telegram_backend": "sim",
            "sim_history_start": "2025-10-01",
            "sim_messages_per_day": 300,
            "sim_history_requests": 0,
            "sim_resolve_requests": 0,
        }
        values.update(overrides)
        settings = SimSettings(**values)
        session = TelegramSession(
            settings, "acct", clock=clock, client_factory=sim_client_factory(settings)
        )
        await session.connect()
        sessions.append(session)
        store = DayStore(clean_env / data, schema_version="1.0.0", timezone="UTC", clock=clock)
        fetcher = Fetcher(session, store, tz=UTCZ, clock=clock, stop=stop, concurrency=concurrency)
        return fetcher, session, store, clock

    yield make
    for s in sessions:
        await s.close()


def truth(session: TelegramSession, chat_peer_id: int, day: date) -> list[int]:
    start, end = day_bounds(day, UTCZ)
    bare, _ = utils.resolve_id(chat_peer_id)
    return [i for i, _ in session.client.sim.world.messages_between(bare, start, end)]


def history_requests(session: TelegramSession) -> int:
    return int(session.client.sim.requests.get("messages.GetHistory", 0))


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


async def test_batch_range_writes_every_day_exactly_as_the_world_has_it(env: Env) -> None:
    fetcher, session, store, _ = await env()
    cmd = week()
    outcome = await fetcher.run(cmd)
    chat = await session.resolve(cmd.chat)
    assert outcome.days_completed == list(cmd.days) and not outcome.days_failed
    total = 0
    for day in cmd.days:
        doc = read(store.day_path("ru_python", day))
        jsonschema.validate(doc, SCHEMA)
        ids = [m["id"] for m in doc["messages"]]
        assert ids == truth(session, chat.peer_id, day)
        assert doc["message_count"] == len(ids) and doc["date"] == day.isoformat()
        assert doc["schema_version"] == "1.0.0" and doc["timezone"] == "UTC"
        total += len(ids)
    assert outcome.processed == total > 1000
    assert outcome.files == sorted(
        f"data/ru_python/2025/discussions_{d.isoformat()}.json" for d in cmd.days
    )


async def test_an_empty_day_still_gets_its_file(env: Env) -> None:
    fetcher, _session, store, _ = await env(sim_empty_day_ratio=1.0)
    outcome = await fetcher.run(command(mode="date", date="2025-11-05"))
    doc = read(store.day_path("ru_python", date(2025, 11, 5)))
    assert outcome.days_completed == [date(2025, 11, 5)]
    assert doc["message_count"] == 0 and doc["messages"] == []
    assert store.is_complete("ru_python", date(2025, 11, 5))


async def test_per_day_and_batch_write_the_same_messages(env: Env) -> None:
    batch, *_ = await env("batch")
    per_day, _, per_store, _ = await env("per_day", concurrency=3)
    await batch.run(week("batch"))
    outcome = await per_day.run(week("per_day"))
    assert len(outcome.days_completed) == 7
    for day in week().days:
        a = read(batch.store.day_path("ru_python", day))["messages"]
        b = read(per_store.day_path("ru_python", day))["messages"]
        assert a == b


async def test_rerun_skips_complete_days_and_force_rewrites_identical_messages(env: Env) -> None:
    fetcher, session, store, clock = await env()
    await fetcher.run(week())
    path = store.day_path("ru_python", date(2025, 11, 3))
    before = path.read_bytes()
    requests = history_requests(session)

    again = await fetcher.run(week())
    assert again.processed == 0 and len(again.days_skipped) == 7
    assert history_requests(session) == requests  # nothing was asked of Telegram
    assert path.read_bytes() == before

    clock.advance(3600)
    forced = await fetcher.run(week(options={"force": True}))
    assert len(forced.days_completed) == 7
    after = read(path)
    assert after["messages"] == json.loads(before)["messages"]
    assert after["fetched_at"] != json.loads(before)["fetched_at"]


async def test_limit_leaves_a_partial_day_that_the_next_run_completes(env: Env) -> None:
    fetcher, session, store, _ = await env()
    day = date(2025, 11, 4)
    chat = await session.resolve(command(mode="date", date="2025-11-04").chat)
    expected = truth(session, chat.peer_id, day)
    assert len(expected) > 150

    limited = await fetcher.run(command(mode="date", date=day.isoformat(), limit=150))
    assert limited.processed == 150 and limited.days_partial == [day]
    assert [m["id"] for m in read(store.day_path("ru_python", day))["messages"]] == expected[:150]
    assert not store.is_complete("ru_python", day)

    rest = await fetcher.run(command(mode="date", date=day.isoformat()))
    assert rest.processed == len(expected) - 150 and rest.days_completed == [day]
    assert [m["id"] for m in read(store.day_path("ru_python", day))["messages"]] == expected


async def test_today_is_written_but_not_marked_complete(env: Env) -> None:
    fetcher, _session, store, _ = await env()
    outcome = await fetcher.run(command(mode="date", date=NOW.date().isoformat()))
    assert outcome.days_partial == [NOW.date()] and not outcome.days_completed
    doc = read(store.day_path("ru_python", NOW.date()))
    assert doc["messages"] and all(m["date"] < "2025-11-09T12:00:01Z" for m in doc["messages"])
    assert not store.is_complete("ru_python", NOW.date())


async def test_flood_waits_below_the_cap_are_waited_out_on_the_fake_clock(env: Env) -> None:
    fetcher, _session, _store, clock = await env(
        sim_history_requests=3, sim_history_window_seconds=30, flood_wait_max_seconds=60
    )
    outcome = await fetcher.run(week())
    assert len(outcome.days_completed) == 7 and not outcome.days_failed
    floods = [s for s in clock.sleeps if s >= 1]
    assert floods, "the simulator's limit must have caused flood waits"
    assert all(s <= 31 + 0.1 for s in floods)  # N seconds + at most FLOOD_WAIT_JITTER_SECONDS


async def test_per_day_flood_above_the_cap_fails_that_day_retryably(env: Env) -> None:
    fetcher, _session, _store, _clock = await env(
        sim_history_requests=4, sim_history_window_seconds=600, flood_wait_max_seconds=5
    )
    outcome = await fetcher.run(week("per_day"))
    assert outcome.days_completed, "the first days fit in the window"
    assert outcome.days_failed, "later days hit a flood wait above the cap"
    for err in outcome.days_failed.values():
        assert isinstance(err, RateLimited) and err.retryable and err.retry_after > 5
    assert set(outcome.days_completed) | set(outcome.days_failed) == set(week().days)


async def test_stop_between_pages_checkpoints_and_a_new_run_resumes(env: Env) -> None:
    stop = asyncio.Event()
    fetcher, session, store, _ = await env(stop=stop, sim_messages_per_day=1000)
    seen: list[int] = []

    async def on_progress(outcome: FetchOutcome) -> None:
        seen.append(outcome.processed)
        stop.set()

    from worker.errors import ShutdownRequested

    with pytest.raises(ShutdownRequested):
        await fetcher.run(week(), on_progress=on_progress)
    assert seen and 0 < seen[0] < 7000
    first_requests = history_requests(session)

    resumed, session2, _, _ = await env(sim_messages_per_day=1000)
    outcome = await resumed.run(week())
    chat = await session2.resolve(week().chat)
    total = sum(len(truth(session2, chat.peer_id, d)) for d in week().days)
    # The journal kept the first run's messages: the second run adds exactly the rest.
    assert outcome.processed == total - seen[-1]
    for day in week().days:
        ids = [m["id"] for m in read(store.day_path("ru_python", day))["messages"]]
        assert ids == truth(session2, chat.peer_id, day)
    assert first_requests > 0


def test_dst_days_are_bucketed_in_the_configured_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start, end = day_bounds(date(2025, 3, 30), berlin)
    assert end - start == timedelta(hours=23)
