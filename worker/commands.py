"""Fetch commands (CONTRACT §3): parsing, validation, and the concrete list of days they name.

Pure logic, no I/O. :func:`parse_command` turns the raw bytes popped from ``tg_commands`` into a
:class:`FetchCommand` or raises :class:`~worker.errors.CommandRejected` with a readable reason.
Both the seed-001 form (``mode`` = ``date`` | ``days`` | ``range``) and the legacy seed-004 form
(``days_back``) are accepted. Days are calendar days in ``DAY_TIMEZONE``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from fleet.chats import ChatId, parse_chat
from worker.errors import CommandRejected

Mode = Literal["date", "days", "range"]
Strategy = Literal["batch", "per_day"]

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_COMMAND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_STRATEGIES = {"batch": "batch", "per_day": "per_day", "auto": "batch", "sequential": "per_day"}
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
    # after_id (issue 14, an addition to CONTRACT §3): fetch only messages above this id, and
    # advance the chat's high-water mark when the command completes. None: an ordinary fetch.
    after_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the normalised JSON, for requeueing

    def to_json(self) -> str:
        """The command as JSON again (with its ``command_id``), for putting it back."""
        return json.dumps(self.raw, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class CommandLimits:
    today: date  # today in DAY_TIMEZONE
    max_range_days: int = 366
    max_command_bytes: int = 65536
    default_strategy: Strategy = "batch"


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
    safe_cid = cid if isinstance(cid, str) and _COMMAND_ID.fullmatch(cid) else None
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
    command = data.get("command")
    if command != "fetch":
        raise CommandRejected(f"unknown command {_show(command)}; the only command is 'fetch'")
    chat_raw = data.get("chat")
    if not isinstance(chat_raw, str):
        raise CommandRejected("'chat' is required and must be a string")
    try:
        chat = parse_chat(chat_raw)
    except ValueError as exc:
        raise CommandRejected(f"invalid chat: {exc}") from None

    mode = data.get("mode")
    if mode is None and "days_back" in data:  # legacy seed-004 form
        mode = "days"
        days_value = data["days_back"]
        params: dict[str, Any] = {"days": days_value}
    elif mode is None:
        raise CommandRejected("'mode' is required: one of date, days, range")
    else:
        days_value = data.get("days")
        params = {}
    if mode not in ("date", "days", "range"):
        raise CommandRejected(f"unknown mode {_show(mode)}; use date, days or range")

    if mode == "date":
        day = _parse_date(data.get("date"), "date")
        _not_future(day, limits.today, "date")
        days: tuple[date, ...] = (day,)
        params = {"date": day.isoformat()}
    elif mode == "days":
        n = _positive_int(days_value, "days_back" if "days_back" in data else "days")
        if n > limits.max_range_days:
            raise CommandRejected(f"days={n} is more than MAX_RANGE_DAYS={limits.max_range_days}")
        days = tuple(limits.today - timedelta(days=i) for i in range(n, 0, -1))
        params = {"days": n}
    else:
        first = _parse_date(data.get("from"), "from")
        last = _parse_date(data.get("to"), "to")
        if first > last:
            raise CommandRejected(f"'from' {first} is after 'to' {last}")
        _not_future(last, limits.today, "to")
        count = (last - first).days + 1
        if count > limits.max_range_days:
            raise CommandRejected(
                f"range covers {count} days, more than MAX_RANGE_DAYS={limits.max_range_days}"
            )
        days = tuple(first + timedelta(days=i) for i in range(count))
        params = {"from": first.isoformat(), "to": last.isoformat()}

    strategy_raw = data.get("strategy", limits.default_strategy)
    if not isinstance(strategy_raw, str) or strategy_raw not in _STRATEGIES:
        raise CommandRejected(
            f"unknown strategy {_show(strategy_raw)}; use batch or per_day (auto, sequential)"
        )
    strategy: Strategy = _STRATEGIES[strategy_raw]  # type: ignore[assignment]

    limit = data.get("limit")
    if limit is not None:
        limit = _positive_int(limit, "limit")

    options = data.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise CommandRejected("'options' must be an object")
    force = options.get("force", False)
    if not isinstance(force, bool):
        raise CommandRejected("'options.force' must be true or false")

    cid = data.get("command_id")
    if cid is None:
        cid = str(uuid.uuid4())
    elif not isinstance(cid, str) or not _COMMAND_ID.fullmatch(cid):
        raise CommandRejected(
            "'command_id' must be a uuid or up to 64 characters of [A-Za-z0-9_.:-]"
        )

    # --- after_id (issue 14; kept apart for the validation rewrite) ---------------------------
    after_id = data.get("after_id")
    if after_id is not None:
        if isinstance(after_id, bool) or not isinstance(after_id, int) or after_id < 0:
            raise CommandRejected(
                f"'after_id' must be a whole number >= 0 (a message id), got {_show(after_id)}"
            )
        if after_id >= 2**63:
            raise CommandRejected(f"'after_id' {after_id} is out of range")
        params["after_id"] = after_id  # echoed in events: an incremental run shows its mark
    # --- end of after_id ---------------------------------------------------------------------

    requested_by = _optional_text(data.get("requested_by"), "requested_by")
    timestamp = _optional_text(data.get("timestamp"), "timestamp")

    raw: dict[str, Any] = {"command": "fetch", "chat": chat_raw, "mode": mode, **params}
    raw.update({"strategy": strategy, "command_id": cid})
    if limit is not None:
        raw["limit"] = limit
    if force:
        raw["options"] = {"force": True}
    if requested_by is not None:
        raw["requested_by"] = requested_by
    if timestamp is not None:
        raw["timestamp"] = timestamp
    return FetchCommand(
        chat=chat,
        mode=mode,  # type: ignore[arg-type]  # checked against the three modes above
        days=days,
        strategy=strategy,
        command_id=cid,
        limit=limit,
        force=force,
        requested_by=requested_by,
        timestamp=timestamp,
        params=params,
        raw=raw,
        after_id=after_id,
    )


def _parse_date(value: object, name: str) -> date:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise CommandRejected(f"'{name}' must be a date YYYY-MM-DD, got {_show(value)}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandRejected(f"'{name}' is not a real date: {value}") from None


def _not_future(day: date, today: date, name: str) -> None:
    if day > today:
        raise CommandRejected(f"'{name}' {day} is in the future (today is {today})")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandRejected(f"'{name}' must be a whole number, got {_show(value)}")
    if value < 1:
        raise CommandRejected(f"'{name}' must be at least 1, got {value}")
    return value


def _optional_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise CommandRejected(f"'{name}' must be a string of at most 256 characters")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
