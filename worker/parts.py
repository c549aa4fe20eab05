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

This module owns what a part is and the split itself; running a part and closing its parent
live in :mod:`worker.partrun`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from fleet.events import make_event
from fleet.scripts import scripts_for
from worker.commands import FetchCommand
from worker.partrun import run_part

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
        await run_part(ex, running, parent, log)
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
