"""The pydantic model of a fetch command's fields (CONTRACT §3) and its rejection reasons.

:func:`worker.commands.parse_command` checks size and nesting first (they protect the parser),
then validates the parsed object with :class:`CommandFields`. Every reason is ours, in words,
because the ``failed`` event shows it to whoever sent the command. The names the model needs
(``CommandLimits``, ``Mode``, ``Strategy``, ``COMMAND_ID``) are defined here and re-exported by
:mod:`worker.commands`, so the two modules import one way and load together at start.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fleet.chats import parse_chat

Mode = Literal["date", "days", "range"]
Strategy = Literal["batch", "per_day"]

#: What a command id may be: safe to echo in events and logs, and to use in Redis keys.
COMMAND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_STRATEGIES = {"batch": "batch", "per_day": "per_day", "auto": "batch", "sequential": "per_day"}


@dataclass(frozen=True)
class CommandLimits:
    """What a command is validated against (the model's validation context)."""

    today: date  # today in DAY_TIMEZONE
    max_range_days: int = 366
    max_command_bytes: int = 65536
    default_strategy: Strategy = "batch"


class _Missing:
    """A key absent from the command (``null`` is a value: ``"strategy": null`` is rejected)."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _rejected(reason: str) -> PydanticCustomError:
    return PydanticCustomError("rejected", "{reason}", {"reason": reason})


class CommandFields(BaseModel):
    """The fields of a fetch command, checked in this order; the first failing check is the
    reason given (fields after a failed one that depend on it skip their checks).

    Every field takes any JSON value and its validator says, in words, what is wrong: the
    reasons are part of the contract (the ``failed`` event shows them to whoever sent the
    command), so they are ours rather than pydantic's. ``limits`` arrive as the validation
    context.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True)

    command: Any = None
    chat: Any = None
    mode: Any = None
    days_key: str = "days"  # "days_back" in the legacy seed-004 form (names it in reasons)
    date: Any = None
    days: Any = None
    from_: Any = Field(None, alias="from")
    to: Any = None
    strategy: Any = _MISSING
    limit: Any = None
    options: Any = None
    command_id: Any = None
    after_id: Any = None
    requested_by: Any = None
    timestamp: Any = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_form(cls, data: Any) -> Any:
        # Seed 004 sent {"days_back": N} and no mode: that is mode "days".
        if not isinstance(data, dict) or "days_back" not in data:
            return data
        data = {**data, "days_key": "days_back"}
        if data.get("mode") is None:
            data.update(mode="days", days=data["days_back"])
        return data

    @field_validator("command")
    @classmethod
    def _is_fetch(cls, value: Any) -> str:
        if value != "fetch":
            raise _rejected(f"unknown command {_show(value)}; the only command is 'fetch'")
        return "fetch"

    @field_validator("chat")
    @classmethod
    def _chat(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise _rejected("'chat' is required and must be a string")
        try:
            parse_chat(value)
        except ValueError as exc:
            raise _rejected(f"invalid chat: {exc}") from None
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: Any) -> Mode:
        if value is None:
            raise _rejected("'mode' is required: one of date, days, range")
        if value not in ("date", "days", "range"):
            raise _rejected(f"unknown mode {_show(value)}; use date, days or range")
        return cast(Mode, value)

    @field_validator("date")
    @classmethod
    def _date(cls, value: Any, info: ValidationInfo) -> date | None:
        if info.data.get("mode") != "date":
            return None
        day = _parse_date(value, "date")
        _not_future(day, _limits(info).today, "date")
        return day

    @field_validator("days")
    @classmethod
    def _days(cls, value: Any, info: ValidationInfo) -> int | None:
        if info.data.get("mode") != "days":
            return None
        n = _positive_int(value, info.data.get("days_key", "days"))
        max_days = _limits(info).max_range_days
        if n > max_days:
            raise _rejected(f"days={n} is more than MAX_RANGE_DAYS={max_days}")
        return n

    @field_validator("from_")
    @classmethod
    def _from(cls, value: Any, info: ValidationInfo) -> date | None:
        return _parse_date(value, "from") if info.data.get("mode") == "range" else None

    @field_validator("to")
    @classmethod
    def _to(cls, value: Any, info: ValidationInfo) -> date | None:
        if info.data.get("mode") != "range":
            return None
        last = _parse_date(value, "to")
        first = info.data.get("from_")
        if first is None:  # 'from' was rejected: that is the reason given
            return last
        limits = _limits(info)
        if first > last:
            raise _rejected(f"'from' {first} is after 'to' {last}")
        _not_future(last, limits.today, "to")
        count = (last - first).days + 1
        if count > limits.max_range_days:
            raise _rejected(
                f"range covers {count} days, more than MAX_RANGE_DAYS={limits.max_range_days}"
            )
        return last

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: Any, info: ValidationInfo) -> Strategy:
        if value is _MISSING:
            value = _limits(info).default_strategy
        if not isinstance(value, str) or value not in _STRATEGIES:
            raise _rejected(
                f"unknown strategy {_show(value)}; use batch or per_day (auto, sequential)"
            )
        return cast(Strategy, _STRATEGIES[value])

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: Any) -> int | None:
        return None if value is None else _positive_int(value, "limit")

    @field_validator("options")
    @classmethod
    def _options(cls, value: Any) -> bool:
        """The ``force`` option (the only one)."""
        if value is None:
            return False
        if not isinstance(value, dict):
            raise _rejected("'options' must be an object")
        force = value.get("force", False)
        if not isinstance(force, bool):
            raise _rejected("'options.force' must be true or false")
        return force

    @field_validator("command_id")
    @classmethod
    def _command_id(cls, value: Any) -> str:
        if value is None:
            return str(uuid.uuid4())
        if not isinstance(value, str) or not COMMAND_ID.fullmatch(value):
            raise _rejected("'command_id' must be a uuid or up to 64 characters of [A-Za-z0-9_.:-]")
        return value

    @field_validator("after_id")
    @classmethod
    def _after_id(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _rejected(
                f"'after_id' must be a whole number >= 0 (a message id), got {_show(value)}"
            )
        if value >= 2**63:
            raise _rejected(f"'after_id' {value} is out of range")
        return value

    @field_validator("requested_by", "timestamp")
    @classmethod
    def _optional_text(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > 256:
            raise _rejected(f"'{info.field_name}' must be a string of at most 256 characters")
        return value

    def command_fields(self, limits: CommandLimits) -> dict[str, Any]:
        """The validated fields of a :class:`worker.commands.FetchCommand`: the days named, and
        the command normalised for requeueing (``raw``)."""
        params: dict[str, Any]
        if self.mode == "date":
            assert self.date is not None
            days: tuple[date, ...] = (self.date,)
            params = {"date": self.date.isoformat()}
        elif self.mode == "days":
            days = tuple(limits.today - timedelta(days=i) for i in range(self.days, 0, -1))
            params = {"days": self.days}
        else:
            first, last = self.from_, self.to
            days = tuple(first + timedelta(days=i) for i in range((last - first).days + 1))
            params = {"from": first.isoformat(), "to": last.isoformat()}
        if self.after_id is not None:
            params["after_id"] = self.after_id  # echoed in events: a run shows its mark
        raw: dict[str, Any] = {"command": "fetch", "chat": self.chat, "mode": self.mode, **params}
        raw.update({"strategy": self.strategy, "command_id": self.command_id})
        if self.limit is not None:
            raw["limit"] = self.limit
        if self.options:
            raw["options"] = {"force": True}
        if self.requested_by is not None:
            raw["requested_by"] = self.requested_by
        if self.timestamp is not None:
            raw["timestamp"] = self.timestamp
        return {
            "chat": parse_chat(self.chat),
            "mode": self.mode,
            "days": days,
            "strategy": self.strategy,
            "command_id": self.command_id,
            "limit": self.limit,
            "force": self.options,
            "requested_by": self.requested_by,
            "timestamp": self.timestamp,
            "params": params,
            "raw": raw,
            "after_id": self.after_id,
        }


def _limits(info: ValidationInfo) -> CommandLimits:
    assert isinstance(info.context, dict)
    limits = info.context["limits"]
    assert isinstance(limits, CommandLimits)
    return limits


def _parse_date(value: object, name: str) -> date:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise _rejected(f"'{name}' must be a date YYYY-MM-DD, got {_show(value)}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _rejected(f"'{name}' is not a real date: {value}") from None


def _not_future(day: date, today: date, name: str) -> None:
    if day > today:
        raise _rejected(f"'{name}' {day} is in the future (today is {today})")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _rejected(f"'{name}' must be a whole number, got {_show(value)}")
    if value < 1:
        raise _rejected(f"'{name}' must be at least 1, got {value}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
