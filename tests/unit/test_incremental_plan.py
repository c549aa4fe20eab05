"""The incremental scheduler's pure decisions: mode, range, after_id, due times (issue 14)."""

from __future__ import annotations

from datetime import date

import pytest

from governor.channels import Channel, parse_backfill, parse_interval, parse_priority
from governor.incremental import Mark, due_at_ms, plan_command
from governor.settings import GovernorSettings

TODAY = date(2025, 11, 8)


def s(**extra: object) -> GovernorSettings:
    return GovernorSettings(parser_scheduler_interval_sec=300, **extra)  # type: ignore[arg-type]


def test_without_a_mark_the_backfill_depth_is_fetched_through_today() -> None:
    mode, cmd = plan_command("x_chat", Channel.new("@x_chat", backfill=3), None, 1, TODAY, s())
    assert mode == "historical"
    assert (cmd["from"], cmd["to"], cmd["after_id"]) == ("2025-11-05", "2025-11-08", 0)
    assert cmd["command_id"] == "sched:x_chat:1" and cmd["mode"] == "range"


def test_full_backfill_is_capped_by_parser_full_backfill_days() -> None:
    ch = Channel.new("@x_chat", backfill="full")
    _, cmd = plan_command("x_chat", ch, None, 1, TODAY, s(parser_full_backfill_days=30))
    assert cmd["from"] == "2025-10-09"


def test_with_a_mark_only_messages_above_it_from_its_day() -> None:
    mark = Mark(977, date(2025, 11, 6))
    mode, cmd = plan_command("x_chat", Channel.new("@x_chat"), mark, 4, TODAY, s())
    assert mode == "incremental"
    assert (cmd["from"], cmd["to"], cmd["after_id"]) == ("2025-11-06", "2025-11-08", 977)


@pytest.mark.parametrize(
    ("override", "mark", "expected"),
    [
        ("historical", Mark(5, TODAY), ("historical", "2025-11-01", 0)),
        ("incremental", None, ("incremental", "2025-11-08", 0)),
    ],
)
def test_the_mode_override_forces_one_mode(
    override: str, mark: Mark | None, expected: tuple[str, str, int]
) -> None:
    mode, cmd = plan_command(
        "x_chat", Channel.new("@x_chat"), mark, 1, TODAY, s(parser_mode_override=override)
    )
    assert (mode, cmd["from"], cmd["after_id"]) == expected


def test_due_after_the_interval_or_sooner_to_retry_a_failure() -> None:
    ch = Channel.new("@x_chat", interval=600)
    assert due_at_ms(ch, {}, s()) == 0
    assert due_at_ms(ch, {"enqueued_ms": 1000}, s()) == 601_000
    failed = {"enqueued_ms": 1000, "finished_ms": 2000, "failures": 2}
    assert due_at_ms(ch, failed, s(parser_retry_max=3)) == 12_000  # 5 s · 2
    assert due_at_ms(ch, {**failed, "failures": 4}, s(parser_retry_max=3)) == 601_000


@pytest.mark.parametrize(
    ("parse", "bad"),
    [
        (parse_backfill, "-1"),
        (parse_backfill, "forever"),
        (parse_interval, "0.5"),
        (parse_interval, "soon"),
        (parse_priority, "high"),
        (parse_priority, 5000),
    ],
)
def test_bad_channel_settings_are_refused_with_the_reason(parse: object, bad: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse(bad)  # type: ignore[operator]


def test_a_backfill_may_be_per_day_so_the_fleet_can_split_it() -> None:
    settings = s(parser_historical_strategy="per_day")
    _, hist = plan_command("x_chat", Channel.new("@x_chat"), None, 1, TODAY, settings)
    _, inc = plan_command("x_chat", Channel.new("@x_chat"), Mark(5, TODAY), 2, TODAY, settings)
    assert (hist["strategy"], inc["strategy"]) == ("per_day", "batch")
