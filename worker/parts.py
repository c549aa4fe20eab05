"""One large fetch spread over the whole fleet: per-day parts of a ``per_day`` command (issue 14).

With ``FETCH_SPLIT_PER_DAY=true``, a worker that takes a ``per_day`` command over more than one
day (and without ``limit``) does not fetch it: ``fleet/lua/split.lua`` atomically replaces it,
in the worker's processing list, with one ordinary ``date`` command per day pushed to the tail of
``tg_commands``, plus a record ``split:<command_id>`` (:mod:`fleet.keys`). Any free worker, on
its own session and under its own per-account limit, takes a part like any command (reliable
queue, recovery after a kill, retries), so the days are fetched in parallel across the fleet.

A part is the parent's JSON with ``mode: date``, its ``date``, ``command_id`` =
``part:<16 hex of the parent id>:<YYYYMMDD>`` and ``part_of`` = the parent's ``command_id``
(an internal field). Events (CONTRACT §4) stay the parent's:

- ``started`` once, by the worker that split it;
- ``progress`` after each part, with the parent's ``command_id``, the ``worker_id`` of the
  worker that ran the part and the sums over the parts finished so far;
- exactly one terminal event, by the worker that finished the last part: ``completed``
  (``files`` of every day) or, if some day failed for good, ``failed`` naming the failed days.

Counting a part into its parent is idempotent (``part_done.lua`` removes its day from the
pending set once), so a part re-run after its worker died is not counted twice. A parent with
``after_id`` advances the chat's high-water mark when its last part closes it, only if every
day succeeded (``split_close.lua``, same rule as ``ack.lua``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet.events import make_event
from fleet.scripts import scripts_for, text
from worker.commands import FetchCommand
from worker.errors import (
    BreakerOpen,
    FetchError,
    PermanentError,
    RateLimited,
    SessionRevoked,
    ShutdownRequested,
)

if TYPE_CHECKING:
    from worker.executor import CommandExecutor, Running


def part_of(entry: bytes) -> str | None:
    """The parent's ``command_id`` if ``entry`` is a part, else ``None``."""
    try:
        data = json.loads(entry)
    except ValueError:
        return None
    parent = data.get("part_of") if isinstance(data, dict) else None
    return parent if isinstance(parent, str) and parent else None


def part_id(parent_id: str, day: str) -> str:
    digest = hashlib.sha1(parent_id.encode("utf-8")).hexdigest()[:16]
    return f"part:{digest}:{day.replace('-', '')}"


def lock_key(entry: bytes, cmd: FetchCommand) -> str:
    """The executor's per-chat lock: per chat and day for a part (days never share files)."""
    if part_of(entry) is not None:
        return f"{cmd.chat.key}:{cmd.days[0].isoformat()}"
    return cmd.chat.key


def should_split(ex: CommandExecutor, entry: bytes, cmd: FetchCommand) -> bool:
    return (
        ex.settings.fetch_split_per_day
        and cmd.strategy == "per_day"
        and len(cmd.days) > 1
        and cmd.limit is None
        and part_of(entry) is None
    )


async def execute(ex: CommandExecutor, running: Running, log: Any) -> None:
    """The executor's hook: split, run a part, or run the command as before."""
    if should_split(ex, running.entry, running.cmd):
        await _split(ex, running, log)
    elif (parent := part_of(running.entry)) is not None:
        await _run_part(ex, running, parent, log)
    else:
        await ex._run_fetch(running, log)


def _parts(cmd: FetchCommand, parent_json: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for day in cmd.days:
        iso = day.isoformat()
        part = {
            k: v
            for k, v in parent_json.items()
            if k not in ("mode", "days", "from", "to", "date", "days_back", "command_id")
        }
        part.update(
            {
                "mode": "date",
                "date": iso,
                "strategy": "batch",
                "command_id": part_id(cmd.command_id, iso),
                "part_of": cmd.command_id,
            }
        )
        out.append((iso, json.dumps(part, ensure_ascii=False, separators=(",", ":"))))
    return out


async def _split(ex: CommandExecutor, running: Running, log: Any) -> None:
    cmd = running.cmd
    keys = ex.queue.keys
    parent_key = keys.split(cmd.command_id)
    args: list[Any] = [
        running.entry,
        cmd.command_id,
        cmd.chat.display,
        cmd.mode,
        json.dumps(cmd.params, separators=(",", ":")),
        int(time.time() * 1000),
        cmd.days[-1].isoformat(),
    ]
    for day, raw in _parts(cmd, dict(cmd.raw)):
        args.extend([day, raw])
    script = scripts_for(ex.queue.client).split
    result = await ex.link.call(
        lambda: script(
            keys=[
                ex.queue.processing,
                keys.commands,
                parent_key,
                parent_key + ":pending",
                keys.running,
            ],
            args=args,
        ),
        "split",
    )
    if int(result) == -1:
        running.taken_over = True
        log.warning("command was recovered by another worker before it was split; no event")
        return
    if int(result) == 0:
        log.info("command {} is already split into parts; this copy dropped", cmd.command_id)
        return
    await ex.publisher.publish(
        make_event(
            "started",
            command_id=cmd.command_id,
            chat=cmd.chat.display,
            mode=cmd.mode,
            params=cmd.params,
            worker_id=ex.worker_id,
        )
    )
    log.info(
        "command split into {} per-day parts for the fleet",
        len(cmd.days),
        event="command_split",
        total=len(cmd.days),
    )


async def _run_part(ex: CommandExecutor, running: Running, parent: str, log: Any) -> None:
    from worker.fetch import Fetcher

    s = ex.settings
    cmd = running.cmd
    tried = _tried(running.entry)
    if _session(ex) in tried and len(tried) < await ex.link.call(
        lambda: _live_sessions(ex), "sessions"
    ):
        # This session already found the chat unreadable: leave the part to another one.
        await _hand_on(ex, running.entry, cmd.command_id, 0.2)
        return
    running.started = time.monotonic()
    ex._on_busy()
    fetcher = Fetcher(
        ex.telegram,
        ex.store,
        tz=s.tz,
        concurrency=s.fetch_concurrency,
        stop=running.stop,
        metrics=ex.metrics,
    )
    outcome = None
    failure: FetchError | None = None
    try:
        outcome = await fetcher.run(cmd)
    except ShutdownRequested:
        log.info("part interrupted by shutdown; it goes back to the queue")
        return
    except SessionRevoked as exc:
        ex.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
        log.error("session revoked during a part; it goes back to the queue")
        ex._on_revoked(exc)
        return
    except FetchError as exc:
        failure = exc
    except Exception as exc:  # an internal error fails this day, not the whole fleet's fetch
        failure = FetchError(f"internal error: {type(exc).__name__}: {exc}")
        log.opt(exception=exc).error("internal error in a part")
    if failure is None and outcome is not None and outcome.days_failed:
        failure = outcome.first_error
    if not await ex._still_ours(running, log):
        return
    if failure is not None and _unreadable_here(failure) and await _try_another(ex, running, log):
        return
    if failure is not None and not isinstance(failure, PermanentError) and failure.retryable:
        done = await ex.link.call(lambda: ex.queue.retries(cmd.command_id), "retry count")
        if done < s.command_retry_max:
            if isinstance(failure, RateLimited | BreakerOpen):
                delay = max(failure.retry_after, s.command_retry_base_seconds)
            else:
                delay = min(s.command_retry_max_seconds, s.command_retry_base_seconds * 2**done)
            await ex.link.call(
                lambda: ex.queue.retry_later(running.entry, cmd.command_id, delay), "retry later"
            )
            ex._finished(running, "retrying", failure.type_name, outcome)
            log.warning("part {} failed, retry in {:.0f}s: {}", cmd.days[0], delay, failure)
            return
    day = cmd.days[0].isoformat()
    ok = failure is None
    error = "" if ok else f"{failure.type_name}: {failure}"  # type: ignore[union-attr]
    if not ok and _unreadable_here(failure):  # type: ignore[arg-type]
        error += f" (on {len(set(tried) | {_session(ex)})} sessions)"
    partial = outcome is not None and bool(outcome.days_partial)
    keys = ex.queue.keys
    base = keys.split(parent)
    split_keys = [
        ex.queue.processing,
        keys.completed,
        keys.deliveries,
        keys.retries,
        keys.running,
        base,
        base + ":pending",
        base + ":files",
        base + ":failed",
    ]
    scripts = scripts_for(ex.queue.client)
    reply = await ex.link.call(
        lambda: scripts.part_done(
            keys=split_keys,
            args=[
                running.entry,
                cmd.command_id,
                day,
                "1" if ok else "0",
                outcome.processed if outcome else 0,
                outcome.errors if outcome else int(not ok),
                outcome.max_id if outcome else 0,
                json.dumps(outcome.files if outcome else []),
                error,
                "1" if partial else "0",
                ex.queue.completed_ttl_ms,
            ],
        ),
        "part done",
    )
    ex._finished(running, "ok" if ok else "failed", None if ok else "PartFailed", outcome)
    ex.tally.served += 1
    state = int(reply[0])
    record = _record(reply[1])
    if state == 0:
        log.info("part {} ran after its parent {} was closed; nothing to add", day, parent)
        return
    event = _parent_event(ex, parent, record)
    if state == 1:
        await ex.publisher.publish(event("progress"))
        log.info("part {} of {} done ({}/{})", day, parent, record["done"], record["total"])
        return
    failed = json.loads(record.get("failed") or "{}")
    files = json.loads(record.get("files") or "[]")
    files = files if isinstance(files, list) else []  # Lua encodes an empty list as {}
    if failed:
        days = ", ".join(f"{d} ({e})" for d, e in sorted(failed.items()))
        final = event(
            "failed",
            error_type="DaysFailed",
            error_message=f"{len(failed)} of {record['total']} days failed: {days}",
            retryable=False,
        )
    else:
        status = "partial" if int(record.get("partial") or 0) else "ok"
        final = event("completed", status=status, files=files)
    await ex.publisher.publish(final)
    parent_cmd = json.loads(record["parent"])
    after_id = parent_cmd.get("after_id")
    mark_key = cmd.chat.key if isinstance(after_id, int) and not failed else ""
    mark_id = max(int(record.get("max_id") or 0), after_id if isinstance(after_id, int) else 0)
    last_day = record.get("last_day") or day
    await ex.link.call(
        lambda: scripts.split_close(
            keys=[*split_keys, keys.hwm],
            args=[
                running.entry,
                cmd.command_id,
                parent,
                "0" if failed else "1",
                ex.queue.completed_ttl_ms,
                mark_key,
                mark_id,
                last_day,
            ],
        ),
        "close split",
    )
    log.info(
        "split command {} {}: {} messages over {} days",
        parent,
        final["event"],
        record["processed"],
        record["total"],
        event="split_closed",
    )


def _unreadable_here(failure: FetchError) -> bool:
    """CHANNEL_PRIVATE: this account cannot read the chat; another account may (issue 14).
    The Telegram boundary keeps Telethon's error as the cause; its name is enough here."""
    return isinstance(failure, PermanentError) and (
        type(failure.__cause__).__name__ == "ChannelPrivateError"
    )


def _session(ex: CommandExecutor) -> str:
    return str(getattr(ex.telegram, "session_name", ex.worker_id))


def _tried(entry: bytes) -> list[str]:
    try:
        tried = json.loads(entry).get("tried_sessions") or []
    except (ValueError, AttributeError):
        return []
    return [str(t) for t in tried] if isinstance(tried, list) else []


async def _live_sessions(ex: CommandExecutor) -> int:
    """Distinct sessions of the workers whose lease is alive (this one included)."""
    client, keys = ex.queue.client, ex.queue.keys
    sessions = {_session(ex)}
    for wid, info in (await client.hgetall(keys.workers)).items():
        if not await client.exists(keys.worker_lease(text(wid))):
            continue
        try:
            session = json.loads(info).get("session")
        except (ValueError, AttributeError):
            continue
        if isinstance(session, str):
            sessions.add(session)
    return len(sessions)


async def _try_another(ex: CommandExecutor, running: Running, log: Any) -> bool:
    """Put the part back, marked as unreadable on this session, while some live session has
    not tried it; False when every one has (then the day fails)."""
    tried = sorted(set(_tried(running.entry)) | {_session(ex)})
    if len(tried) >= await ex.link.call(lambda: _live_sessions(ex), "sessions"):
        return False
    data = json.loads(running.entry)
    data["tried_sessions"] = tried
    new = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    cid = running.cmd.command_id
    if not await ex.link.call(lambda: ex.queue.replace(running.entry, new), "mark tried"):
        return True  # taken away meanwhile: not ours to report
    running.entry = new
    task = asyncio.current_task()
    if task is not None and task in ex.held:
        ex.held[task] = new  # the daemon knows the entry this task holds (no orphan adopted)
    await _hand_on(ex, new, cid, 0.1)
    log.warning(
        "part {}: session {} cannot read the chat; another session will try",
        running.cmd.days[0],
        _session(ex),
    )
    return True


async def _hand_on(ex: CommandExecutor, entry: bytes, cid: str, delay_s: float) -> None:
    """Park the part for another worker (not a retry: nothing counted), and forget that this
    worker runs it, or the next worker would defer it as a duplicate of ours."""
    await ex.link.call(
        lambda: ex.queue.retry_later(entry, cid, delay_s, count=False), "hand on part"
    )
    await ex.link.call(lambda: ex.queue.client.hdel(ex.queue.keys.running, cid), "unclaim")


def _record(flat: list[Any]) -> dict[str, str]:
    items = [text(x) for x in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _parent_event(
    ex: CommandExecutor, parent: str, record: dict[str, str]
) -> Callable[..., dict[str, Any]]:
    started_ms = int(record.get("started_ms") or 0)

    def event(kind: Any, **extra: Any) -> dict[str, Any]:
        return make_event(
            kind,
            command_id=parent,
            chat=record.get("chat"),
            mode=record.get("mode"),
            params=json.loads(record.get("params") or "{}"),
            worker_id=ex.worker_id,
            processed=int(record.get("processed") or 0),
            errors=int(record.get("errors") or 0),
            duration_sec=max(0.0, time.time() - started_ms / 1000) if started_ms else 0.0,
            **extra,
        )

    return event
