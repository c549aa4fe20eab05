"""No silent gaps: a day is marked complete only once the server confirms its end.

The simulator plays the hostile servers (SIM_SHIFTED_WINDOW, SIM_IGNORE_OFFSET_DATE) under the
real Telethon client; the fetcher writes real day files.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import jsonschema
import pytest

from fleet.clock import FakeClock
from tests.integration.daemon_harness import Fleet, RedisView, fetch, wait_for
from tests.integration.test_fetch import (  # noqa: F401 - env is a fixture
    SCHEMA,
    Env,
    command,
    env,
    history_requests,
    read,
    truth,
)
from worker.errors import GapDetected
from worker.storage import DayStore
from worker.telegram import TelegramSession

# Just after midnight: today has almost no messages yet, so the last page of yesterday reaches
# past the newest message, where a shifting server answers with a shifted window.
EARLY = datetime(2025, 11, 9, 0, 5, tzinfo=UTC)
DAYS = [date(2025, 11, 6), date(2025, 11, 7), date(2025, 11, 8)]


def three_days(strategy: str = "batch") -> Any:
    return command(mode="range", strategy=strategy, **{"from": "2025-11-06", "to": "2025-11-08"})


def written_ids(store: DayStore, day: date) -> list[int]:
    path = store.day_path("ru_python", day)
    return [m["id"] for m in read(path)["messages"]] if path.exists() else []


def check_no_silent_gap(
    session: TelegramSession, store: DayStore, peer_id: int, days: list[date]
) -> list[date]:
    """Every day marked complete holds exactly the world's messages; returns those days."""
    complete = []
    for day in days:
        if store.is_complete("ru_python", day):
            assert written_ids(store, day) == truth(session, peer_id, day), day
            complete.append(day)
    return complete


@pytest.mark.parametrize("strategy", ["batch", "per_day"])
async def test_shifted_window_pages_never_leave_a_complete_day_with_a_gap(
    env: Env,  # noqa: F811 - the fixture imported above
    strategy: str,
) -> None:
    fetcher, session, store, _ = await env(
        clock=FakeClock(EARLY), sim_shifted_window=True, sim_empty_day_ratio=0.0
    )
    cmd = three_days(strategy)
    chat = await session.resolve(cmd.chat)
    outcome = await fetcher.run(cmd)
    # Either every message is written and each day proven, or a day is left incomplete with
    # a retryable error: never "complete" with a gap.
    complete = check_no_silent_gap(session, store, chat.peer_id, DAYS)
    assert sorted(complete + list(outcome.days_failed)) == DAYS
    assert all(e.retryable for e in outcome.days_failed.values())
    # This history makes the shifted window bite on the last day (the page that should have
    # ended the day stopped Telethon's iteration); the proof saw it and resumed the day.
    assert complete == DAYS
    assert read(store.day_path("ru_python", DAYS[-1]))["completeness"]["resumed"] >= 1


async def test_a_server_ignoring_offset_date_fails_the_day_retryably_instead_of_emptying_it(
    env: Env,  # noqa: F811
) -> None:
    fetcher, session, store, _ = await env(sim_ignore_offset_date=True, sim_empty_day_ratio=0.0)
    cmd = command(mode="date", date="2025-11-06")
    chat = await session.resolve(cmd.chat)
    with pytest.raises(GapDetected) as info:
        await fetcher.run(cmd)
    assert info.value.retryable
    assert "GAP: day 2025-11-06" in str(info.value)
    assert not store.is_complete("ru_python", date(2025, 11, 6))
    check_no_silent_gap(session, store, chat.peer_id, [date(2025, 11, 6)])


async def test_each_complete_day_records_how_it_was_proven_at_one_request_per_day(
    env: Env,  # noqa: F811
) -> None:
    fetcher, session, store, _ = await env(sim_empty_day_ratio=0.0)
    cmd = command(mode="range", strategy="batch", **{"from": "2025-11-01", "to": "2025-11-07"})
    chat = await session.resolve(cmd.chat)
    before = history_requests(session)
    outcome = await fetcher.run(cmd)
    assert outcome.days_completed == list(cmd.days)
    assert outcome.proof_requests == len(cmd.days)  # one extra request per day, no more
    paging = history_requests(session) - before - outcome.proof_requests
    assert paging >= 1
    for day in cmd.days:
        doc = read(store.day_path("ru_python", day))
        jsonschema.validate(doc, SCHEMA)
        ids = truth(session, chat.peer_id, day)
        proof = doc["completeness"]
        assert proof["method"] == ("day_end" if day == cmd.days[-1] else "next_message")
        assert proof["server_last_id"] == ids[-1]
        assert proof["resumed"] == 0
        assert proof["missing_ids"] == ids[-1] - ids[0] + 1 - len(ids)
        assert doc["chat_id"] == chat.peer_id


async def test_an_empty_day_is_proven_by_the_message_before_it(
    env: Env,  # noqa: F811
) -> None:
    fetcher, _, store, _ = await env(sim_empty_day_ratio=1.0)
    outcome = await fetcher.run(command(mode="date", date="2025-11-06"))
    assert outcome.days_completed == [date(2025, 11, 6)]
    doc = read(store.day_path("ru_python", date(2025, 11, 6)))
    assert doc["message_count"] == 0
    assert doc["completeness"]["method"] == "no_messages"
    assert doc["completeness"]["missing_ids"] == 0


async def test_messages_deleted_while_a_day_is_fetched_never_cost_a_message_still_there(
    env: Env,  # noqa: F811
) -> None:
    fetcher, session, store, _ = await env(
        sim_empty_day_ratio=0.0, sim_delete_every_history_requests=2
    )
    cmd = command(mode="range", strategy="batch", **{"from": "2025-11-05", "to": "2025-11-07"})
    chat = await session.resolve(cmd.chat)
    outcome = await fetcher.run(cmd)
    deleted = set(session.client.sim.deleted)
    assert deleted  # the server did delete messages during the fetch
    assert outcome.days_completed == list(cmd.days)
    for day in cmd.days:
        written = set(written_ids(store, day))
        now_there = set(truth(session, chat.peer_id, day))
        assert now_there <= written, day  # nothing still on the server is missing
        assert written - now_there <= deleted  # extra ones were deleted after being written
        doc = read(store.day_path("ru_python", day))
        ids = sorted(written)
        assert doc["completeness"]["missing_ids"] == ids[-1] - ids[0] + 1 - len(ids)


def test_daemon_reports_an_unprovable_day_as_a_retryable_failure_naming_the_gap(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(1, SIM_IGNORE_OFFSET_DATE="true", COMMAND_RETRY_MAX=1)
    rv.push(fetch("@ru_python", "2025-03-01", command_id="c-gap"))
    failed = wait_for(
        lambda: [e for e in rv.events() if e["event"] == "failed"], 30, "a failed event"
    )
    assert failed[0]["retryable"] is True
    assert failed[0]["error"]["type"] == "GapDetected"
    assert "GAP: day 2025-03-01" in failed[0]["error"]["message"]
