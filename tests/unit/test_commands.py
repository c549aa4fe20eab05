"""Command validation (CONTRACT §3): every rejection reason, legacy form, day expansion."""

from __future__ import annotations

import contextlib
import json
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.commands import (
    CommandLimits,
    day_bounds,
    parse_command,
    salvage_identity,
    today_in,
)
from worker.errors import CommandRejected

TODAY = date(2025, 11, 9)
LIMITS = CommandLimits(today=TODAY, max_range_days=31, max_command_bytes=4096)


def cmd(**fields: object) -> bytes:
    base: dict[str, object] = {"command": "fetch", "chat": "@ru_python"}
    base.update(fields)
    return json.dumps(base).encode()


def reject(payload: bytes | str, fragment: str) -> None:
    with pytest.raises(CommandRejected) as info:
        parse_command(payload, LIMITS)
    assert fragment in str(info.value)


def test_date_mode_names_one_day() -> None:
    c = parse_command(cmd(mode="date", date="2025-11-07", strategy="batch"), LIMITS)
    assert c.days == (date(2025, 11, 7),)
    assert c.params == {"date": "2025-11-07"}
    assert c.chat.key == "ru_python" and c.chat.display == "@ru_python"
    assert c.strategy == "batch"


def test_days_mode_means_whole_days_before_today() -> None:
    c = parse_command(cmd(mode="days", days=3), LIMITS)
    assert c.days == (date(2025, 11, 6), date(2025, 11, 7), date(2025, 11, 8))
    assert parse_command(cmd(mode="days", days=1), LIMITS).days == (date(2025, 11, 8),)


def test_range_mode_is_inclusive() -> None:
    c = parse_command(cmd(mode="range", **{"from": "2025-11-01", "to": "2025-11-07"}), LIMITS)
    assert c.days[0] == date(2025, 11, 1) and c.days[-1] == date(2025, 11, 7)
    assert len(c.days) == 7
    assert c.params == {"from": "2025-11-01", "to": "2025-11-07"}


def test_legacy_seed_004_form_means_days_back() -> None:
    c = parse_command(
        cmd(chat="pythonstepikchat", days_back=2, limit=100, strategy="auto", requested_by="u1"),
        LIMITS,
    )
    assert c.mode == "days" and len(c.days) == 2
    assert c.limit == 100 and c.strategy == "batch" and c.requested_by == "u1"
    assert (
        parse_command(cmd(mode="date", date="2025-11-01", strategy="sequential"), LIMITS).strategy
        == "per_day"
    )


def test_command_id_is_kept_or_assigned_and_round_trips() -> None:
    given_id = parse_command(cmd(mode="days", days=1, command_id="abc-1"), LIMITS)
    assert given_id.command_id == "abc-1"
    assigned = parse_command(cmd(mode="days", days=1), LIMITS)
    assert len(assigned.command_id) == 36
    again = parse_command(assigned.to_json(), LIMITS)
    assert again.command_id == assigned.command_id and again.days == assigned.days


def test_force_option() -> None:
    assert parse_command(cmd(mode="days", days=1, options={"force": True}), LIMITS).force
    reject(cmd(mode="days", days=1, options={"force": "yes"}), "options.force")
    reject(cmd(mode="days", days=1, options=[1]), "'options' must be an object")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "must be a JSON object"),
        (cmd(command="delete", mode="days", days=1), "unknown command"),
        (
            json.dumps({"command": "fetch", "mode": "days", "days": 1}).encode(),
            "'chat' is required",
        ),
        (cmd(chat=42, mode="days", days=1), "'chat' is required and must be a string"),
        (cmd(chat="../../etc/passwd", mode="days", days=1), "invalid chat"),
        (cmd(), "'mode' is required"),
        (cmd(mode="week"), "unknown mode"),
        (cmd(mode="date", date="2025-02-30"), "not a real date"),
        (cmd(mode="date", date="07.11.2025"), "must be a date YYYY-MM-DD"),
        (cmd(mode="date", date="2025-11-10"), "in the future"),
        (cmd(mode="days", days=0), "at least 1"),
        (cmd(mode="days", days="3"), "whole number"),
        (cmd(mode="days", days=True), "whole number"),
        (cmd(mode="days", days=32), "MAX_RANGE_DAYS"),
        (cmd(mode="range", **{"from": "2025-11-07", "to": "2025-11-01"}), "is after"),
        (cmd(mode="range", **{"from": "2015-01-01", "to": "2025-01-01"}), "MAX_RANGE_DAYS"),
        (cmd(mode="range", **{"from": "2025-11-01", "to": "2025-12-01"}), "in the future"),
        (cmd(mode="days", days=1, strategy="parallel"), "unknown strategy"),
        (cmd(mode="days", days=1, limit=-5), "at least 1"),
        (cmd(mode="days", days=1, command_id="../x"), "command_id"),
        (cmd(mode="days", days=1, requested_by={"a": 1}), "requested_by"),
        (
            b'{"command":"fetch","chat":"@abcd","mode":"days","days":1,"x":'
            + b"[" * 20
            + b"]" * 20
            + b"}",
            "nested deeper",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "MAX_COMMAND_BYTES"),
    ],
)
def test_every_rejection_reason_is_readable(payload: bytes, fragment: str) -> None:
    reject(payload, fragment)


def test_payload_over_max_bytes_is_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object, **__: object) -> None:
        raise AssertionError("json.loads must not see an oversized payload")

    monkeypatch.setattr("worker.commands.json.loads", boom)
    reject(b'{"command":"fetch","chat":"' + b"a" * 5000 + b'"}', "MAX_COMMAND_BYTES")


def test_salvage_identity_only_returns_safe_strings() -> None:
    assert salvage_identity(cmd(command_id="c-1", mode="x")) == ("c-1", "@ru_python")
    assert salvage_identity(b"nope") == (None, None)
    assert salvage_identity(json.dumps({"command_id": "../../x", "chat": 5})) == (None, None)


def test_day_bounds_follow_the_zone_including_dst() -> None:
    utc = ZoneInfo("UTC")
    start, end = day_bounds(date(2025, 11, 7), utc)
    assert (end - start).total_seconds() == 86400
    berlin = ZoneInfo("Europe/Berlin")
    start, end = day_bounds(date(2025, 10, 26), berlin)  # DST ends: a 25-hour day
    assert (end - start).total_seconds() == 25 * 3600
    assert start.isoformat() == "2025-10-25T22:00:00+00:00"


def test_today_in_zone() -> None:
    moment = datetime(2025, 11, 8, 23, 30, tzinfo=ZoneInfo("UTC"))
    assert today_in(ZoneInfo("UTC"), moment) == date(2025, 11, 8)
    assert today_in(ZoneInfo("Europe/Moscow"), moment) == date(2025, 11, 9)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
hostile_fields = st.fixed_dictionaries(
    {},
    optional={
        "command": st.sampled_from(["fetch", "FETCH", "", None]) | json_values,
        "chat": st.sampled_from(["../x", "/etc/passwd", "@a/../b", "..", "@ok_chat_1", "\u202e"])
        | st.text(max_size=300)
        | json_values,
        "mode": st.sampled_from(["date", "days", "range", "x"]) | json_values,
        "date": st.sampled_from(["2025-02-30", "2025-11-07", "9999-12-31", "0000-00-00"])
        | st.text(max_size=12),
        "days": st.integers(min_value=-10, max_value=10**6) | json_values,
        "from": st.dates().map(str) | st.text(max_size=12),
        "to": st.dates().map(str) | st.text(max_size=12),
        "strategy": st.sampled_from(["batch", "per_day", "auto", "weird"]) | json_values,
        "limit": json_values,
        "options": json_values,
        "command_id": st.text(max_size=80) | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(hostile_fields)
def test_hostile_payloads_are_accepted_cleanly_or_rejected_readably(fields: dict) -> None:
    payload = json.dumps(fields)
    try:
        c = parse_command(payload, LIMITS)
    except CommandRejected as exc:
        assert str(exc) and len(str(exc)) < 400
        return
    assert c.days and all(d <= TODAY for d in c.days)
    assert len(c.days) <= LIMITS.max_range_days
    assert c.chat.key and all(ch.isalnum() or ch in "_-" for ch in c.chat.key)
    assert c.chat.key not in (".", "..")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(payload: bytes) -> None:
    # Either outcome is fine; any other exception fails the test.
    with contextlib.suppress(CommandRejected):
        parse_command(payload, LIMITS)


def test_with_several_faults_the_reason_is_the_first_in_field_order() -> None:
    # chat before mode before the days before strategy before limit: one reason, always the same.
    reject(cmd(chat=1, mode="week", strategy="x"), "'chat' is required")
    reject(cmd(mode="range", **{"from": "x", "to": "y"}, strategy="x"), "'from' must be a date")
    reject(cmd(mode="days", days=0, strategy="x", limit=0), "'days' must be at least 1")
    reject(cmd(mode="days", days=1, strategy="x", limit=0), "unknown strategy")
    reject(cmd(days_back=0, days=5), "'days_back' must be at least 1")  # the legacy form


def test_a_null_strategy_is_rejected_but_a_missing_one_takes_the_default() -> None:
    reject(cmd(mode="days", days=1, strategy=None), "unknown strategy None")
    per_day = CommandLimits(today=TODAY, default_strategy="per_day")
    assert parse_command(cmd(mode="days", days=1), per_day).strategy == "per_day"
