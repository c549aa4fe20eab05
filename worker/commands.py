"""Fetch commands (CONTRACT §3): parsing, validation, and the concrete list of days they name.

Pure logic, no I/O. :func:`parse_command` turns the raw bytes popped from ``tg_commands`` into a
:class:`FetchCommand` or raises :class:`~worker.errors.CommandRejected` with a readable reason:
size and nesting are checked before the JSON parser and the model see the payload (they protect
the parser), then the pydantic model (:mod:`worker.commandmodel`) checks the fields.
Both the seed-001 form (``mode`` = ``date`` | ``days`` | ``range``) and the legacy seed-004 form
(``days_back``) are accepted. Days are calendar days in ``DAY_TIMEZONE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from fleet.chats import ChatId
from worker.commandmodel import COMMAND_ID, CommandFields, CommandLimits, Mode, Strategy
from worker.errors import CommandRejected

__all__ = [
    "COMMAND_ID",
    "CommandLimits",
    "FetchCommand",
    "Mode",
    "Strategy",
    "day_bounds",
    "parse_command",
    "salvage_identity",
    "today_in",
]

_MAX_DEPTH = 8


@dataclass(frozen=True)
class FetchCommand:
    """A validated fetch command."""

    chat: ChatId
    mode: Mode
    days: tuple[date, ...]  # ascending, every day of the interval
    strategy: Strategy
    command_id: str
    limit: int | None = None
    force: bool = False
    requested_by: str | None = None
    timestamp: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # echoed in events, as given
    raw: dict[str, Any] = field(default_factory=dict)  # the normalised JSON, for requeueing
    # after_id (issue 14, an addition to CONTRACT §3): fetch only messages above this id, and
    # advance the chat's high-water mark when the command completes. None: an ordinary fetch.
    after_id: int | None = None

    def to_json(self) -> str:
        """The command as JSON again (with its ``command_id``), for putting it back."""
        return json.dumps(self.raw, ensure_ascii=False, separators=(",", ":"))


def today_in(tz: ZoneInfo, now: datetime) -> date:
    return now.astimezone(tz).date()


def day_bounds(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants [start, end) of a calendar day in ``tz`` (DST-safe)."""
    start = datetime.combine(day, time(0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def salvage_identity(raw: bytes | str) -> tuple[str | None, str | None]:
    """Best effort ``(command_id, chat)`` from a rejected payload, for its ``failed`` event.

    Only strings that are safe to echo are returned; anything else is ``None``.
    """
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    cid = data.get("command_id")
    chat = data.get("chat")
    safe_cid = cid if isinstance(cid, str) and COMMAND_ID.fullmatch(cid) else None
    safe_chat = chat if isinstance(chat, str) and len(chat) <= 256 else None
    return safe_cid, safe_chat


def parse_command(raw: bytes | str, limits: CommandLimits) -> FetchCommand:
    """Validate a raw command; raise :class:`CommandRejected` with a readable reason."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > limits.max_command_bytes:
        raise CommandRejected(
            f"command is {size} bytes, more than MAX_COMMAND_BYTES={limits.max_command_bytes}"
        )
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise CommandRejected(f"command is not valid JSON: {exc}") from None
    except RecursionError:
        raise CommandRejected("command is nested too deeply") from None
    if not isinstance(data, dict):
        raise CommandRejected(f"command must be a JSON object, not {type(data).__name__}")
    if _depth(data) > _MAX_DEPTH:
        raise CommandRejected(f"command is nested deeper than {_MAX_DEPTH} levels")
    return _validate(data, limits)


def _depth(value: object, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _validate(data: dict[str, Any], limits: CommandLimits) -> FetchCommand:
    try:
        model = CommandFields.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]  # in field order: the first check that failed
        if first["type"] == "rejected":
            raise CommandRejected(first["msg"]) from None
        where = ".".join(str(part) for part in first["loc"]) or "command"
        raise CommandRejected(f"invalid {where}: {first['msg']}") from None
    return FetchCommand(**model.command_fields(limits))
