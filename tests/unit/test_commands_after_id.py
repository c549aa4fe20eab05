"""``after_id`` (issue 14, an addition to CONTRACT §3): validated, echoed, kept on requeue."""

from __future__ import annotations

import json
from datetime import date

import pytest

from worker.commands import CommandLimits, parse_command
from worker.errors import CommandRejected

LIMITS = CommandLimits(today=date(2025, 11, 8))


def cmd(**extra: object) -> str:
    base = {"command": "fetch", "chat": "@ru_python", "mode": "range"}
    base.update({"from": "2025-11-07", "to": "2025-11-08", **extra})
    return json.dumps(base)


def test_after_id_is_optional_and_absent_means_an_ordinary_fetch() -> None:
    parsed = parse_command(cmd(), LIMITS)
    assert parsed.after_id is None and "after_id" not in parsed.raw


def test_after_id_is_kept_in_params_and_in_the_requeued_json() -> None:
    parsed = parse_command(cmd(after_id=1234), LIMITS)
    assert parsed.after_id == 1234
    assert parsed.params["after_id"] == 1234
    assert json.loads(parsed.to_json())["after_id"] == 1234
    assert parse_command(cmd(after_id=0), LIMITS).after_id == 0


@pytest.mark.parametrize("bad", [-1, "12", 1.5, True, "x", 2**63])
def test_a_bad_after_id_is_rejected_with_a_readable_reason(bad: object) -> None:
    with pytest.raises(CommandRejected, match="after_id"):
        parse_command(cmd(after_id=bad), LIMITS)
