"""Operator subcommands of ``python -m worker`` (seed 004's scripts, with the reliable queue).

- ``run`` — the daemon (also what ``python -m worker`` does with no subcommand).
- ``send --chat C (--date D | --days N | --from A [--to B]) [--strategy S] [--limit N]
  [--force] [--command-id ID] [--wait]`` — validates the command as a worker would, pushes it
  to ``tg_commands`` and prints its ``command_id``; ``--wait`` then follows its events and exits
  0 on ``completed``, 1 on a final ``failed``.
- ``listen [--command-id ID] [--json] [--replay N] [--until-terminal]`` — prints events as they
  come, read from the events stream (so nothing is missed across a Redis reconnect, and
  ``--replay N`` shows the last N first).
- ``status [--json] [--clear-bad SESSION]`` — queue length, workers (lease, processing list),
  session leases and bad sessions, delayed retries, dead letters, completed ids, events.
- ``dead-letters [--json] [--limit N] [--requeue ID]`` — lists dead letters (newest first) or
  puts one back on the queue.
- ``check`` — exits 0 if the health file is fresh, 1 otherwise (Docker ``HEALTHCHECK``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from fleet.deadletters import list_dead_letters, requeue_dead_letter
from fleet.events import TERMINAL, parse_event
from fleet.exitcodes import Exit
from fleet.keys import Keys
from fleet.redisconn import REDIS_DOWN, connect
from fleet.scripts import text
from worker.cmdline import add_command_arguments, build_send_payload, format_event
from worker.commands import CommandLimits, parse_command, today_in
from worker.errors import CommandRejected
from worker.settings import WorkerSettings


def add_parsers(sub: Any) -> None:
    """Add ``run``, ``send``, ``listen``, ``status``, ``dead-letters`` and ``check``."""
    sub.add_parser("run", help="run the worker daemon (the default)")

    send = sub.add_parser("send", help="push a fetch command to tg_commands")
    add_command_arguments(send, one_shot=False)
    send.add_argument("--command-id", help="the command's id (default: a new uuid)")
    send.add_argument("--requested-by", help="echoed in events")
    send.add_argument("--wait", action="store_true", help="follow its events until the end")
    send.add_argument("--timeout", type=float, default=0, help="with --wait: give up after S")

    listen = sub.add_parser("listen", help="print events from tg_events")
    listen.add_argument("--command-id", help="only this command's events")
    listen.add_argument("--json", action="store_true", help="raw JSON, one event per line")
    listen.add_argument("--replay", type=int, default=0, help="first show the last N events")
    listen.add_argument(
        "--until-terminal", action="store_true", help="exit after the first terminal event"
    )
    listen.add_argument("--timeout", type=float, default=0, help="exit after S seconds")

    status = sub.add_parser("status", help="queue, workers, sessions, dead letters")
    status.add_argument("--json", action="store_true")
    status.add_argument("--clear-bad", metavar="SESSION", help="forget a session's bad mark")

    dead = sub.add_parser("dead-letters", help="list dead letters or requeue one")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--limit", type=int, default=50, help="newest N (0: all)")
    dead.add_argument("--requeue", metavar="ID", help="put this dead letter back on the queue")

    sub.add_parser("check", help="exit 0 if the worker's health file is fresh (Docker)")


# --- run ------------------------------------------------------------------------------------------


def cmd_run(settings: WorkerSettings, args: argparse.Namespace) -> int:
    from worker.daemon import run

    return run(settings)


# --- send -----------------------------------------------------------------------------------------


def cmd_send(settings: WorkerSettings, args: argparse.Namespace) -> int:
    today = today_in(settings.tz, datetime.now(UTC))
    payload = build_send_payload(args, today)
    limits = CommandLimits(
        today=today,
        max_range_days=settings.max_range_days,
        max_command_bytes=settings.max_command_bytes,
        default_strategy=settings.fetch_strategy,
    )
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        parse_command(raw, limits)
    except CommandRejected as exc:
        print(f"invalid command: {exc}", file=sys.stderr)
        return Exit.USAGE
    return _run_redis(settings, lambda client, keys: _send(client, keys, raw, payload, args))


async def _send(
    client: Redis, keys: Keys, raw: str, payload: dict[str, Any], args: argparse.Namespace
) -> int:
    cid = payload["command_id"]
    start_id = "$"
    if args.wait:  # note the stream's end first, so no event of ours can be missed
        last = await client.xrevrange(keys.events_stream, count=1)
        start_id = text(last[0][0]) if last else "0-0"
    await client.rpush(keys.commands, raw)
    print(cid, flush=True)
    if not args.wait:
        return Exit.OK
    return await _follow(client, keys, start_id, cid, False, True, args.timeout)


# --- listen ---------------------------------------------------------------------------------------


def cmd_listen(settings: WorkerSettings, args: argparse.Namespace) -> int:
    async def go(client: Redis, keys: Keys) -> int:
        last: list[Any] = list(
            await client.xrevrange(keys.events_stream, count=max(1, args.replay)) or []
        )
        start_id = text(last[0][0]) if last else "0-0"
        if args.command_id and args.replay <= 0:
            # One command's events are read from the start of the (capped) stream: a command
            # that ended before `listen` started must not leave `--until-terminal` waiting.
            start_id = "0-0"
        for _entry_id, fields in reversed(last if args.replay > 0 else []):
            done = _show(fields, args.command_id, args.json, args.until_terminal)
            if done is not None:
                return done
        return await _follow(
            client, keys, start_id, args.command_id, args.json, args.until_terminal, args.timeout
        )

    return _run_redis(settings, go)


async def _follow(
    client: Redis,
    keys: Keys,
    start_id: str,
    command_id: str | None,
    as_json: bool,
    until_terminal: bool,
    timeout_s: float,
) -> int:
    """Print events from the stream after ``start_id``; reconnects through outages."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    last_id = start_id
    down_since: float | None = None
    while deadline is None or time.monotonic() < deadline:
        try:
            reply: Any = await client.xread({keys.events_stream: last_id}, count=100, block=1000)
        except REDIS_DOWN as exc:
            if down_since is None:
                down_since = time.monotonic()
                print(f"# redis unreachable ({exc}); retrying", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)
            continue
        if down_since is not None:
            print("# redis reachable again", file=sys.stderr, flush=True)
            down_since = None
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = text(entry_id)
                done = _show(fields, command_id, as_json, until_terminal)
                if done is not None:
                    return done
    return Exit.FAILED if until_terminal else Exit.OK


def _show(fields: Any, command_id: str | None, as_json: bool, until_terminal: bool) -> int | None:
    """Print one stream entry's event if it matches; an exit code once the end is reached."""
    raw = fields.get(b"event") or fields.get("event")
    event = parse_event(raw) if raw is not None else None
    if event is None or (command_id and event.get("command_id") != command_id):
        return None
    print(format_event(event, as_json), flush=True)
    if until_terminal and event.get("event") in TERMINAL:
        if event.get("event") == "completed":
            return Exit.OK
        if not event.get("retryable"):
            return Exit.FAILED
    return None


# --- status ---------------------------------------------------------------------------------------


def cmd_status(settings: WorkerSettings, args: argparse.Namespace) -> int:
    async def go(client: Redis, keys: Keys) -> int:
        if args.clear_bad:
            removed = await client.hdel(keys.sessions_bad, args.clear_bad)
            print(f"session {args.clear_bad}: bad mark {'cleared' if removed else 'not found'}")
            return Exit.OK
        report = await gather_status(client, keys)
        if args.json:
            print(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            print(_status_text(report))
        return Exit.OK

    return _run_redis(settings, go)


async def gather_status(client: Redis, keys: Keys) -> dict[str, Any]:
    """Everything ``status`` shows, as a dict."""
    workers: dict[str, dict[str, Any]] = {}
    for wid_raw, info_raw in (await client.hgetall(keys.workers)).items():
        try:
            info = json.loads(info_raw)
        except ValueError:
            info = {}
        workers[text(wid_raw)] = {"info": info}
    prefix = keys.processing("")
    async for key in client.scan_iter(match=keys.processing("*"), count=500):
        workers.setdefault(text(key)[len(prefix) :], {"info": None})
    for wid, row in workers.items():
        ttl = await client.pttl(keys.worker_lease(wid))
        row["lease_ms"] = ttl if ttl > 0 else None
        row["alive"] = ttl > 0
        row["processing"] = await client.llen(keys.processing(wid))
    sessions: dict[str, Any] = {}
    lease_prefix = keys.session_lease("x")[:-1]
    async for key in client.scan_iter(match=lease_prefix + "*", count=500):
        name = text(key)[len(lease_prefix) :]
        sessions[name] = {
            "holder": text(await client.get(key) or b"").split("|", 1)[-1],
            "lease_ms": await client.pttl(key),
        }
    bad = {text(k): json.loads(v) for k, v in (await client.hgetall(keys.sessions_bad)).items()}
    next_due = await client.zrange(keys.delayed, 0, 0, withscores=True)
    return {
        "queue": {"name": keys.commands, "length": await client.llen(keys.commands)},
        "workers": workers,
        "sessions": sessions,
        "bad_sessions": bad,
        "delayed": {
            "count": await client.zcard(keys.delayed),
            "next_due_ms": int(next_due[0][1]) if next_due else None,
        },
        "dead_letters": await client.llen(keys.dead_letters),
        "completed_ids": await client.zcard(keys.completed),
        "events_stream": await client.xlen(keys.events_stream),
    }


def _status_text(r: dict[str, Any]) -> str:
    lines = [f"queue {r['queue']['name']}: {r['queue']['length']} commands waiting"]
    lines.append(f"workers: {len(r['workers'])}")
    for wid, row in sorted(r["workers"].items()):
        state = f"alive (lease {row['lease_ms']} ms)" if row["alive"] else "DEAD (no lease)"
        session = (row.get("info") or {}).get("session", "?")
        lines.append(f"  {wid}: {state}, session {session}, holding {row['processing']}")
    lines.append(f"session leases: {len(r['sessions'])}")
    for name, row in sorted(r["sessions"].items()):
        lines.append(f"  {name}: held by {row['holder'] or '?'} ({row['lease_ms']} ms left)")
    if r["bad_sessions"]:
        lines.append("bad sessions (clear with: status --clear-bad NAME):")
        for name, mark in sorted(r["bad_sessions"].items()):
            lines.append(f"  {name}: {mark.get('reason')} (since {mark.get('ts')})")
    delayed = r["delayed"]
    due = ""
    if delayed["next_due_ms"] is not None:
        due = f", next due in {max(0.0, delayed['next_due_ms'] / 1000 - time.time()):.0f}s"
    lines.append(f"delayed retries: {delayed['count']}{due}")
    lines.append(f"dead letters: {r['dead_letters']} (see: python -m worker dead-letters)")
    lines.append(f"completed ids remembered: {r['completed_ids']}")
    lines.append(f"events in stream: {r['events_stream']}")
    return "\n".join(lines)


# --- dead letters ---------------------------------------------------------------------------------


def cmd_dead_letters(settings: WorkerSettings, args: argparse.Namespace) -> int:
    async def go(client: Redis, keys: Keys) -> int:
        if args.requeue:
            try:
                letter = await requeue_dead_letter(client, keys, args.requeue)
            except ValueError as exc:
                print(str(exc), file=sys.stderr)
                return Exit.FAILED
            if letter is None:
                print(f"no dead letter {args.requeue}", file=sys.stderr)
                return Exit.FAILED
            print(f"requeued dead letter {letter.id} (command {letter.command_id or '-'})")
            return Exit.OK
        letters = await list_dead_letters(client, keys, args.limit)
        total = await client.llen(keys.dead_letters)
        for letter in letters:
            payload = (letter.payload or b"").decode("utf-8", "replace")
            if args.json:
                row = {
                    "id": letter.id,
                    "ts": letter.ts,
                    "reason": letter.reason,
                    "error_type": letter.error_type,
                    "command_id": letter.command_id,
                    "chat": letter.chat,
                    "worker_id": letter.worker_id,
                    "source": letter.source,
                    "payload_bytes": letter.payload_bytes,
                    "truncated": letter.truncated,
                    "payload": payload,
                }
                print(json.dumps(row, ensure_ascii=False))
            else:
                preview = payload[:80].replace("\n", " ")
                if len(payload) > 80 or letter.truncated:
                    preview += f"… ({letter.payload_bytes} bytes)"
                print(
                    f"{letter.id}  {letter.ts}  {letter.source:<10}  "
                    f"cmd={letter.command_id or '-'}  chat={letter.chat or '-'}\n"
                    f"    reason: {letter.reason}\n    payload: {preview}"
                )
        if not args.json:
            print(f"{len(letters)} of {total} dead letters shown", file=sys.stderr)
        return Exit.OK

    return _run_redis(settings, go)


# --- check ----------------------------------------------------------------------------------------


def cmd_check(settings: WorkerSettings, args: argparse.Namespace) -> int:
    from worker.health import check

    healthy, reason = check(settings.health_file, settings.health_max_age_seconds)
    print(("healthy: " if healthy else "unhealthy: ") + reason, file=sys.stderr)
    return Exit.OK if healthy else Exit.FAILED


# --- helpers --------------------------------------------------------------------------------------


def _run_redis(settings: WorkerSettings, body: Any) -> int:
    async def main() -> int:
        client = connect(settings.redis_dsn())
        try:
            return int(await body(client, Keys(settings.redis_key_prefix)))
        except REDIS_DOWN as exc:
            print(f"redis {settings.redis_display()} unreachable: {exc}", file=sys.stderr)
            return Exit.REDIS_UNAVAILABLE
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return Exit.OK


HANDLERS = {
    "run": cmd_run,
    "send": cmd_send,
    "listen": cmd_listen,
    "status": cmd_status,
    "dead-letters": cmd_dead_letters,
    "check": cmd_check,
}
