"""What the worker's command lines share: the options that make a fetch command, the command
payloads they build (CONTRACT §3) and how an event is printed.

Its own module so that ``worker.cli`` (``fetch``), ``worker.ops`` (``send``, ``listen``) and
``worker.demo`` depend on it instead of on each other (they used to import each other in a
loop).
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fleet.clock import utc_iso


def add_command_arguments(parser: argparse.ArgumentParser, *, one_shot: bool) -> None:
    """The options that make a fetch command (``fetch`` runs it, ``send`` queues it); the
    one-shot ``fetch`` also takes ``--yesterday`` and ``--full``."""
    parser.add_argument("--chat", required=True, help="@username, t.me link or numeric id")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--date", help="one day, YYYY-MM-DD")
    when.add_argument("--days", type=int, help="the N whole days before today (default 1)")
    if one_shot:
        when.add_argument(
            "--yesterday", action="store_true", help="yesterday (default unless FETCH_MODE=full)"
        )
    when.add_argument("--from", dest="from_", metavar="FROM", help="first day of a range")
    if one_shot:
        when.add_argument("--full", action="store_true", help="the whole history up to yesterday")
    parser.add_argument("--to", help="last day of a range (with --from; default yesterday)")
    parser.add_argument("--strategy", choices=["batch", "per_day", "auto", "sequential"])
    parser.add_argument("--limit", type=int, help="at most this many messages in total")
    parser.add_argument("--force", action="store_true", help="re-fetch days already complete")


def build_fetch_payload(args: argparse.Namespace, today: date) -> dict[str, object]:
    """The command a ``fetch`` invocation means, in CONTRACT §3 form."""
    payload: dict[str, object] = {"command": "fetch", "chat": args.chat}
    if args.date:
        payload.update(mode="date", date=args.date)
    elif args.days:
        payload.update(mode="days", days=args.days)
    elif args.from_:
        to = args.to or (today - timedelta(days=1)).isoformat()
        payload.update({"mode": "range", "from": args.from_, "to": to})
    else:
        payload.update(mode="days", days=1)
    if args.strategy:
        payload["strategy"] = args.strategy
    if args.limit is not None:
        payload["limit"] = args.limit
    if args.force:
        payload["options"] = {"force": True}
    return payload


def build_send_payload(args: argparse.Namespace, today: Any) -> dict[str, Any]:
    """The command ``fetch`` would run, plus what a queued command carries: its id, who asked,
    when."""
    payload: dict[str, Any] = dict(build_fetch_payload(args, today))
    payload["command_id"] = args.command_id or str(uuid.uuid4())
    if args.requested_by:
        payload["requested_by"] = args.requested_by
    payload["timestamp"] = utc_iso(datetime.now(UTC))
    return payload


def format_event(event: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    kind = str(event.get("event"))
    parts = [
        str(event.get("ts", "?")),
        f"{kind:<9}",
        str(event.get("chat") or "-"),
        f"id={event.get('command_id') or '-'}",
        f"processed={event.get('processed', 0)}",
        f"errors={event.get('errors', 0)}",
        f"{float(event.get('duration_sec') or 0):.1f}s",
        f"worker={event.get('worker_id', '?')}",
    ]
    if kind == "completed":
        parts.append(f"files={len(event.get('files') or [])} status={event.get('status')}")
    if kind == "failed":
        error = event.get("error") or {}
        again = "will retry" if event.get("retryable") else "final"
        parts.append(f"[{again}] {error.get('type')}: {error.get('message')}")
    return "  ".join(parts)
