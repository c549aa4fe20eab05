"""The incremental scheduler (issue 14, seed 003): keep every active channel current.

With ``FEATURE_INCREMENTAL_PARSING_ENABLED=true`` the leading governor evaluates, every governor
tick, the active channels (:mod:`governor.channels`). A channel is *due* when it has never run,
when its interval (``--interval`` or ``PARSER_SCHEDULER_INTERVAL_SEC``) has passed since its
last command was pushed, or — after a failed run, up to ``PARSER_RETRY_MAX`` times in a row —
after a backoff of ``RETRY_BASE_S · 2^(n-1)`` (at most the interval). Paused channels and
channels with a command still queued, delayed, held or running are not due. For each due
channel, highest ``priority`` first and at most ``PARSER_MAX_CONCURRENCY`` scheduler commands
in flight, it pushes one ordinary fetch command, so every worker guarantee (reliable queue,
retries, recovery, limits) holds:

- **historical** (no high-water mark yet): the configured backfill, the N whole days before
  today plus today::

    {"command": "fetch", "chat": "@x", "mode": "range", "from": <today-N>, "to": <today>,
     "strategy": "batch", "after_id": 0, "command_id": "sched:x:1", "requested_by": "scheduler"}

- **incremental** (a mark ``{id, day}``): the same with ``from`` = the mark's day and
  ``after_id`` = its id — only messages above the mark, through today. Days already complete
  are skipped by the worker, so the range costs one history pass from the mark.

``PARSER_MODE_OVERRIDE`` forces one mode (``incremental`` without a mark: today only).

The mark is written by the worker, by ``ack.lua``, when a command carrying ``after_id``
completes: after its day files and ``progress.json``, in the step that acknowledges it. A
crash anywhere before leaves the old mark, so the next run fetches the same messages again
(day files merge by id: no duplicates) and nothing is skipped. The push itself is one atomic
call (``fleet/lua/schedule_tick.lua``) that also notices finished commands and compare-and-sets
the chat's sequence number and mark as this governor read them, so a failover, a governor killed
mid-tick, or two governors that both believe they lead never push a second command for a chat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.keys import Keys
from fleet.scripts import scripts_for, text
from governor.channels import Channel, ChannelStore, load_channels_yaml
from governor.scheduler import parse_chats
from governor.settings import GovernorSettings

RETRY_BASE_S = 5.0  # first retry of a failed run after 5 s, then 10, 20, … (capped at interval)


@dataclass(frozen=True, slots=True)
class Mark:
    """A chat's high-water mark (``hwm``)."""

    id: int
    day: date
    at_ms: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> Mark | None:
        try:
            data = json.loads(raw)
            return cls(int(data["id"]), date.fromisoformat(data["day"]), data.get("at"))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class Planned:
    """One command this tick would push."""

    key: str
    channel: Channel
    mode: str
    seq: int
    expected_seq: int
    expected_mark: str
    command: dict[str, Any]
    due_ms: int

    @property
    def raw(self) -> str:
        return json.dumps(self.command, separators=(",", ":"), ensure_ascii=False)


@dataclass
class TickResult:
    pushed: list[Planned] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (chat key, ok|failed)
    in_flight: int = 0
    ran: bool = False  # the atomic step ran (something was due or in flight)


def decode_map(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def load_state(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        st = json.loads(raw)
    except ValueError:
        return {}
    return st if isinstance(st, dict) else {}


def interval_of(channel: Channel, settings: GovernorSettings) -> float:
    return channel.interval or settings.parser_scheduler_interval_sec


def due_at_ms(channel: Channel, state: dict[str, Any], settings: GovernorSettings) -> int:
    """When (Redis ms) the channel's next run is due; 0 = now (it never ran)."""
    enqueued = state.get("enqueued_ms")
    if not isinstance(enqueued, int | float):
        return 0
    interval = interval_of(channel, settings)
    failures = int(state.get("failures") or 0)
    finished = state.get("finished_ms")
    if 0 < failures <= settings.parser_retry_max and isinstance(finished, int | float):
        backoff = min(interval, RETRY_BASE_S * 2 ** (failures - 1))
        return int(finished + backoff * 1000)
    return int(enqueued + interval * 1000)


def plan_command(
    key: str,
    channel: Channel,
    mark: Mark | None,
    seq: int,
    today: date,
    settings: GovernorSettings,
) -> tuple[str, dict[str, Any]]:
    """``(mode, command)`` of the channel's next run (pure)."""
    override = settings.parser_mode_override
    mode = override if override != "auto" else ("incremental" if mark else "historical")
    oldest = today - timedelta(days=settings.parser_full_backfill_days)
    if mode == "historical":
        depth = (
            settings.parser_full_backfill_days
            if channel.backfill == "full"
            else min(int(channel.backfill), settings.parser_full_backfill_days)
        )
        first, after_id = today - timedelta(days=depth), 0
    elif mark is not None:
        first, after_id = min(max(mark.day, oldest), today), mark.id
    else:
        first, after_id = today, 0
    command = {
        "command": "fetch",
        "chat": channel.chat,
        "mode": "range",
        "from": first.isoformat(),
        "to": today.isoformat(),
        # A backfill may be long: with per_day, workers that split spread it over the fleet.
        "strategy": settings.parser_historical_strategy if mode == "historical" else "batch",
        "after_id": after_id,
        "command_id": f"sched:{key}:{seq}",
        "requested_by": "scheduler",
    }
    return mode, command


class IncrementalScheduler:
    """The Redis side: read channels, marks and states; push what is due in one atomic call."""

    def __init__(self, redis: Redis, keys: Keys, settings: GovernorSettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.channels = ChannelStore(redis, keys)
        self._script = scripts_for(redis).schedule_tick
        self._warned_broken: set[str] = set()

    async def seed(self) -> list[Channel]:
        """Add the channels of ``SCHEDULE_CHATS`` and ``PARSER_CHANNELS_FILE`` that are not
        active yet (a channel the operator changed or removed stays as it is until named
        again). A bad file raises ``ValueError`` naming the entry (checked at start)."""
        s = self.settings
        wanted = [
            Channel.new(chat, backfill=s.parser_default_backfill_days)
            for chat in parse_chats(s.schedule_chats)
        ]
        if s.parser_channels_file is not None:
            wanted.extend(load_channels_yaml(Path(s.parser_channels_file)))
        return await self.channels.add_missing(wanted)

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def tick(self) -> TickResult:
        """Plan every channel that is due and push the plan in one atomic call."""
        now = await self.now_ms()
        planned, inflight = await self._plan(now)
        if not planned and not inflight:
            return TickResult()
        return await self._push(planned)

    async def _plan(self, now: int) -> tuple[list[Planned], dict[str, str]]:
        """The due channels' commands, and the channels with a run in flight (read in this
        order: channels, in-flight runs, states, marks)."""
        s = self.settings
        today = datetime.fromtimestamp(now / 1000, UTC).astimezone(s.tz).date()
        channels = await self.channels.all()
        for broken in set(self.channels.broken) - self._warned_broken:
            logger.error("channel record {!r} in Redis does not parse; skipped", broken)
            self._warned_broken.add(broken)
        inflight = decode_map(await self.redis.hgetall(self.keys.sched_inflight))
        states = decode_map(await self.redis.hgetall(self.keys.sched_state))
        marks = decode_map(await self.redis.hgetall(self.keys.hwm))
        planned: list[Planned] = []
        for key, channel in channels.items():
            if channel.paused or key in inflight:
                continue
            state = load_state(states.get(key))
            due = due_at_ms(channel, state, s)
            if due > now:
                continue
            expected = int(state.get("seq") or 0)
            mode, command = plan_command(
                key,
                channel,
                Mark.parse(marks[key]) if key in marks else None,
                expected + 1,
                today,
                s,
            )
            planned.append(
                Planned(
                    key, channel, mode, expected + 1, expected, marks.get(key, ""), command, due
                )
            )
        return planned, inflight

    async def _push(self, planned: list[Planned]) -> TickResult:
        """Push the plan, highest priority first, up to PARSER_MAX_CONCURRENCY in flight."""
        s = self.settings
        result = TickResult()
        planned.sort(key=lambda p: (-p.channel.priority, p.due_ms, p.key))
        args: list[Any] = [
            self.keys.processing_prefix,
            s.parser_max_concurrency,
            self.keys.split_prefix,
        ]
        for p in planned:
            args.extend([p.key, str(p.expected_seq), p.expected_mark, p.seq, p.mode, p.raw])
        reply = await self._script(
            keys=[
                self.keys.sched_inflight,
                self.keys.sched_state,
                self.keys.commands,
                self.keys.delayed,
                self.keys.workers,
                self.keys.running,
                self.keys.completed,
                self.keys.hwm,
            ],
            args=args,
        )
        result.ran = True
        result.in_flight = int(reply[0])
        pushed = {text(k) for k in reply[1]}
        result.pushed = [p for p in planned if p.key in pushed]
        for item in reply[2]:
            key, _, outcome = text(item).rpartition(" ")
            result.finished.append((key, outcome))
        return result


def _iso(ms: float | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def channel_report(
    redis: Redis, keys: Keys, settings: GovernorSettings
) -> list[dict[str, Any]]:
    """Per channel: mode, high-water mark, last success, next run, lag (``status``, ``list``)."""
    store = ChannelStore(redis, keys)
    channels = await store.all()
    inflight = decode_map(await redis.hgetall(keys.sched_inflight))
    states = decode_map(await redis.hgetall(keys.sched_state))
    marks = decode_map(await redis.hgetall(keys.hwm))
    seconds, micros = await redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    out = []
    for key, ch in sorted(channels.items(), key=lambda kv: (-kv[1].priority, kv[0])):
        state = load_state(states.get(key))
        mark = Mark.parse(marks[key]) if key in marks else None
        override = settings.parser_mode_override
        mode = override if override != "auto" else ("incremental" if mark else "historical")
        ok_ms = state.get("ok_ms")
        next_run: str | None
        if key in inflight:
            next_run = "in flight"
        elif ch.paused:
            next_run = "paused"
        else:
            due = due_at_ms(ch, state, settings)
            next_run = "now" if due <= now else _iso(due)
        out.append(
            {
                "chat": ch.chat,
                "key": key,
                "paused": ch.paused,
                "mode": "paused" if ch.paused else mode,
                "backfill": ch.backfill,
                "interval_s": interval_of(ch, settings),
                "priority": ch.priority,
                "hwm_id": mark.id if mark else None,
                "hwm_day": mark.day.isoformat() if mark else None,
                "last_success": _iso(ok_ms) if isinstance(ok_ms, int | float) else None,
                "last_result": state.get("result"),
                "failures": int(state.get("failures") or 0),
                "next_run": next_run,
                "in_flight": inflight.get(key),
                "lag_s": (now - ok_ms) / 1000 if isinstance(ok_ms, int | float) else None,
            }
        )
    return out


async def split_counts(redis: Redis, keys: Keys) -> tuple[int, int, int]:
    """``(split commands in flight, parts not over, parts held by workers)`` (worker/parts.py).
    SCANs the split records and reads the workers' processing lists: for gauges and status."""
    parents = pending = 0
    async for key in redis.scan_iter(match=keys.split_prefix + "*:pending", count=500):
        parents += 1
        pending += int(await redis.scard(key))
    running = 0
    if parents:
        for wid in await redis.hkeys(keys.workers):
            for entry in await redis.lrange(keys.processing(text(wid)), 0, -1):
                running += b'"part_of"' in (entry if isinstance(entry, bytes) else entry.encode())
    return parents, pending, running
