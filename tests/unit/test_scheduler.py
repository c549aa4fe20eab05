"""The scheduler's pure decision: which fetch commands are due, once a day after HH:MM."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from governor.scheduler import (
    Schedule,
    command_id,
    due_commands,
    due_day,
    fetch_command,
    parse_chats,
    parse_daily_at,
)
from worker.commands import CommandLimits, parse_command


def schedule(chats: str = "@ru_python", at: str = "01:00", tz: str = "UTC") -> Schedule:
    return Schedule(parse_chats(chats), parse_daily_at(at), ZoneInfo(tz))


def test_nothing_is_due_before_the_daily_time() -> None:
    assert due_day(datetime(2025, 11, 8, 0, 59, 59, tzinfo=UTC), schedule()) is None
    assert due_commands(datetime(2025, 11, 8, 0, 30, tzinfo=UTC), schedule()) == []


def test_the_local_day_is_due_from_the_daily_time_until_midnight() -> None:
    s = schedule()
    assert due_day(datetime(2025, 11, 8, 1, 0, tzinfo=UTC), s) == date(2025, 11, 8)
    assert due_day(datetime(2025, 11, 8, 23, 59, tzinfo=UTC), s) == date(2025, 11, 8)


def test_the_daily_time_is_read_in_day_timezone() -> None:
    s = schedule(tz="Europe/Moscow")  # UTC+3
    assert due_day(datetime(2025, 11, 7, 21, 59, tzinfo=UTC), s) is None  # 00:59 local
    assert due_day(datetime(2025, 11, 7, 22, 0, tzinfo=UTC), s) == date(2025, 11, 8)


def test_one_command_per_chat_with_a_deterministic_id() -> None:
    s = schedule("@ru_python, https://t.me/golang_ru ,@ru_python")
    cmds = due_commands(datetime(2025, 11, 8, 2, 0, tzinfo=UTC), s)
    assert cmds == [
        fetch_command("@ru_python", date(2025, 11, 8)),
        fetch_command("@golang_ru", date(2025, 11, 8)),
    ]
    assert cmds[0] == {
        "command": "fetch",
        "chat": "@ru_python",
        "mode": "days",
        "days": 1,
        "strategy": "batch",
        "command_id": "sched:ru_python:2025-11-08",
        "requested_by": "governor",
    }


def test_scheduled_commands_pass_the_workers_validation() -> None:
    for chat in ("@ru_python", "-1001234567890"):
        cmd = fetch_command(chat, date(2025, 11, 8))
        parsed = parse_command(json.dumps(cmd), CommandLimits(today=date(2025, 11, 9)))
        assert parsed.command_id == command_id(chat, date(2025, 11, 8))


def test_an_empty_schedule_is_off() -> None:
    s = schedule("")
    assert not s.enabled
    assert due_commands(datetime(2025, 11, 8, 12, tzinfo=UTC), s) == []


@pytest.mark.parametrize("bad", ["1:00", "24:00", "01:60", "noon", ""])
def test_daily_at_must_be_hh_mm(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_daily_at(bad)


def test_daily_at_parses() -> None:
    assert parse_daily_at("07:30") == time(7, 30)


def test_invalid_chat_is_named() -> None:
    with pytest.raises(ValueError, match="no such"):
        parse_chats("@ok_chat,no such")


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        due_day(datetime(2025, 11, 8, 2, 0), schedule())
