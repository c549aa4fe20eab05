"""Running one per-day part of a split command, and closing its parent (issue 14).

:mod:`worker.parts` describes the split and the parent's events. Here a part is fetched like
any command; then, in order: a chat this session cannot read is handed to another session
(``tried_sessions``), a retryable failure is retried, and otherwise the part is counted into its
parent (``part_done.lua``, idempotent); the worker that counts the last part publishes the
parent's one terminal event and closes the split (``split_close.lua``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet.events import make_event
from fleet.scripts import scripts_for, text
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
    from worker.fetch import FetchOutcome


async def run_part(ex: CommandExecutor, running: Running, parent: str, log: Any) -> None:
    """Fetch the part's day, then hand it on, retry it, or count it into its parent."""
    tried = _tried(running.entry)
    if _session(ex) in tried and len(tried) < await ex.link.call(
        lambda: _live_sessions(ex), "sessions"
    ):
        # This session already found the chat unreadable: leave the part to another one.
        await _hand_on(ex, running.entry, running.cmd.command_id, 0.2)
        return
    fetched = await _fetch_part(ex, running, log)
    if fetched is None:
        return
    outcome, failure = fetched
    if not await ex._still_ours(running, log):
        return
    if failure is not None and _unreadable_here(failure) and await _try_another(ex, running, log):
        return
    if failure is not None and await _retry_part(ex, running, failure, outcome, log):
        return
    await _count_part(ex, running, parent, tried, outcome, failure, log)


async def _fetch_part(
    ex: CommandExecutor, running: Running, log: Any
) -> tuple[FetchOutcome | None, FetchError | None] | None:
    """The fetch's outcome and its failure; ``None`` when the part went back to the queue
    (shutdown, revoked session): then nothing is reported."""
    from worker.fetch import Fetcher

    s = ex.settings
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
        outcome = await fetcher.run(running.cmd)
    except ShutdownRequested:
        log.info("part interrupted by shutdown; it goes back to the queue")
        return None
    except SessionRevoked as exc:
        ex.metrics.fetch_errors_total.labels(type=exc.type_name).inc()
        log.error("session revoked during a part; it goes back to the queue")
        ex._on_revoked(exc)
        return None
    except FetchError as exc:
        failure = exc
    except Exception as exc:  # an internal error fails this day, not the whole fleet's fetch
        failure = FetchError(f"internal error: {type(exc).__name__}: {exc}")
        log.opt(exception=exc).error("internal error in a part")
    if failure is None and outcome is not None and outcome.days_failed:
        failure = outcome.first_error
    return outcome, failure


async def _retry_part(
    ex: CommandExecutor,
    running: Running,
    failure: FetchError,
    outcome: FetchOutcome | None,
    log: Any,
) -> bool:
    """Schedule a retryable failure again while retries remain; True when it was."""
    s = ex.settings
    cmd = running.cmd
    if isinstance(failure, PermanentError) or not failure.retryable:
        return False
    done = await ex.link.call(lambda: ex.queue.retries(cmd.command_id), "retry count")
    if done >= s.command_retry_max:
        return False
    if isinstance(failure, RateLimited | BreakerOpen):
        delay = max(failure.retry_after, s.command_retry_base_seconds)
    else:
        delay = min(s.command_retry_max_seconds, s.command_retry_base_seconds * 2**done)
    await ex.link.call(
        lambda: ex.queue.retry_later(running.entry, cmd.command_id, delay), "retry later"
    )
    ex._finished(running, "retrying", failure.type_name, outcome)
    log.warning("part {} failed, retry in {:.0f}s: {}", cmd.days[0], delay, failure)
    return True


def _split_keys(ex: CommandExecutor, parent: str) -> list[str]:
    """The KEYS of ``part_done.lua`` (and, before the high-water mark, ``split_close.lua``)."""
    keys = ex.queue.keys
    base = keys.split(parent)
    return [
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


async def _count_part(
    ex: CommandExecutor,
    running: Running,
    parent: str,
    tried: list[str],
    outcome: FetchOutcome | None,
    failure: FetchError | None,
    log: Any,
) -> None:
    """Count the part into its parent once; report progress, or close the parent if it was
    the last part."""
    cmd = running.cmd
    day = cmd.days[0].isoformat()
    ok = failure is None
    error = "" if failure is None else f"{failure.type_name}: {failure}"
    if failure is not None and _unreadable_here(failure):
        error += f" (on {len(set(tried) | {_session(ex)})} sessions)"
    partial = outcome is not None and bool(outcome.days_partial)
    split_keys = _split_keys(ex, parent)
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
    if state == 1:
        await ex.publisher.publish(_parent_event(ex, parent, record)("progress"))
        log.info("part {} of {} done ({}/{})", day, parent, record["done"], record["total"])
        return
    await _close_parent(ex, running, parent, record, split_keys, log)


async def _close_parent(
    ex: CommandExecutor,
    running: Running,
    parent: str,
    record: dict[str, str],
    split_keys: list[str],
    log: Any,
) -> None:
    """The last part is counted: publish the parent's terminal event and close the split."""
    cmd = running.cmd
    event = _parent_event(ex, parent, record)
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
    last_day = record.get("last_day") or cmd.days[0].isoformat()
    scripts = scripts_for(ex.queue.client)
    await ex.link.call(
        lambda: scripts.split_close(
            keys=[*split_keys, ex.queue.keys.hwm],
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
