"""The daily scheduler: once a day, a ``fetch`` of yesterday for every scheduled chat.

(With ``FEATURE_INCREMENTAL_PARSING_ENABLED`` the incremental scheduler of
:mod:`governor.incremental` replaces it, and ``SCHEDULE_CHATS`` only names active channels.)

Seed 003 promises that the governor schedules incremental fetches: with ``SCHEDULE_CHATS`` set
(comma-separated chats; empty = off), once per day after ``SCHEDULE_DAILY_AT`` (HH:MM in
``DAY_TIMEZONE``) the leading governor pushes, per chat::

    {"command": "fetch", "chat": "@ru_python", "mode": "days", "days": 1, "strategy": "batch",
     "command_id": "sched:ru_python:2025-11-08", "requested_by": "governor"}

to ``tg_commands``. The decision (:func:`due_commands`) is pure; :class:`Scheduler` is the thin
Redis side. Exactly once per chat and day: ``lua/schedule.lua`` sets the marker
``schedule:<chat>:<date>`` with ``SET NX`` and pushes in the same atomic call, so a governor
restart, a failover to another governor, or two governors that both believe they lead cannot
push twice, and a crash cannot leave a marker without its command. The ``command_id`` is
deterministic too, so even a command pushed by hand for the same day runs once (CONTRACT §3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from fleet.chats import parse_chat
from fleet.keys import Keys
from fleet.scripts import scripts_for

#: Markers live long enough to outlast any clock or failover confusion around midnight.
MARKER_TTL_SECONDS = 3 * 86400

_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def parse_daily_at(value: str) -> time:
    """``HH:MM`` (24 h) as a :class:`datetime.time`; ``ValueError`` otherwise."""
    match = _HHMM.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected HH:MM (24 h), got {value!r}")
    return time(int(match.group(1)), int(match.group(2)))


def parse_chats(value: str) -> tuple[str, ...]:
    """The chats of ``SCHEDULE_CHATS`` in their display form (``@name`` or ``-100…``), each
    once, in the given order; ``ValueError`` naming the first invalid one."""
    out: list[str] = []
    for raw in value.split(","):
        if not raw.strip():
            continue
        try:
            display = parse_chat(raw).display
        except ValueError as exc:
            raise ValueError(f"{raw.strip()!r}: {exc}") from None
        if display not in out:
            out.append(display)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Schedule:
    chats: tuple[str, ...]
    daily_at: time
    tz: ZoneInfo

    @property
    def enabled(self) -> bool:
        return bool(self.chats)


def due_day(now: datetime, schedule: Schedule) -> date | None:
    """The local day whose run is due at ``now`` (aware), or None before ``daily_at``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    local = now.astimezone(schedule.tz)
    if local.time().replace(tzinfo=None) < schedule.daily_at:
        return None
    return local.date()


def command_id(chat: str, day: date) -> str:
    """``sched:<chat key>:<YYYY-MM-DD>`` (fits the worker's ``command_id`` rule)."""
    return f"sched:{parse_chat(chat).key}:{day.isoformat()}"


def fetch_command(chat: str, day: date) -> dict[str, object]:
    """The command the scheduler pushes for ``chat`` on the local day ``day``."""
    return {
        "command": "fetch",
        "chat": chat,
        "mode": "days",
        "days": 1,
        "strategy": "batch",
        "command_id": command_id(chat, day),
        "requested_by": "governor",
    }


def due_commands(now: datetime, schedule: Schedule) -> list[dict[str, object]]:
    """Every command due at ``now`` (the Redis side drops those already pushed today)."""
    day = due_day(now, schedule) if schedule.enabled else None
    if day is None:
        return []
    return [fetch_command(chat, day) for chat in schedule.chats]


class Scheduler:
    """Pushes the due commands, each at most once per chat and day (fleet-wide)."""

    def __init__(self, redis: Redis, keys: Keys, schedule: Schedule) -> None:
        self.redis = redis
        self.keys = keys
        self.schedule = schedule
        self._script = scripts_for(redis).schedule
        self._done: set[str] = set()  # command ids this process saw pushed/marked (no call)

    async def run_once(self, now: datetime) -> list[dict[str, object]]:
        """Push what is due and not yet pushed; returns the commands this call pushed."""
        pushed: list[dict[str, object]] = []
        for cmd in due_commands(now, self.schedule):
            cid = str(cmd["command_id"])
            if cid in self._done:
                continue
            marker = self.keys.schedule_marker(cid.removeprefix("sched:"))
            payload = json.dumps(cmd, separators=(",", ":"))
            fresh = await self._script(
                keys=[marker, self.keys.commands], args=[payload, MARKER_TTL_SECONDS]
            )
            self._done.add(cid)
            if int(fresh):
                pushed.append(cmd)
        if len(self._done) > 4 * max(1, len(self.schedule.chats)):
            self._done.clear()  # bounded: at worst one extra SET NX per chat
        return pushed
