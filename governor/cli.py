"""``python -m governor``: the governor's command line.

``run`` (the default) starts the daemon (:mod:`governor.daemon`); ``status`` prints the shared
state every worker obeys — rates, tokens left, pauses in force, the breaker, the leader, the
workers and the queue length — as text, or JSON with ``--json``. Settings are built once here
and passed down; a bad setting exits 78 with one line on stderr (supervisord must not restart
a governor in a loop on a typo).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from fleet.bucket import parse_window
from fleet.exitcodes import Exit
from fleet.settings import ConfigError, load_settings
from governor.settings import GovernorSettings

__all__ = ["Exit", "GovernorSettings", "gather_status", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    cmd = args.cmd or "run"
    try:
        settings = load_settings(GovernorSettings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    try:
        if cmd == "status":
            return _status(settings, as_json=args.json)
        if cmd == "channels":
            return _channels(settings, args)
        _setup_logging(settings)
        from governor.daemon import run

        return run(settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m governor", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the governor daemon (default)")
    status = sub.add_parser("status", help="print rates, tokens, pauses, breaker, workers")
    status.add_argument("--json", action="store_true", help="one JSON document")
    _channels_parser(sub)
    return parser


def _setup_logging(settings: GovernorSettings) -> None:
    from fleet.logs import setup_logging

    setup_logging(settings, worker_id=settings.resolved_governor_id(), component="governor")


# --- status -----------------------------------------------------------------------------------


async def gather_status(settings: GovernorSettings) -> dict[str, Any]:
    """Everything ``status`` prints, as a dict."""
    from fleet.breaker import CircuitBreaker
    from fleet.bucket import TokenBucket
    from fleet.keys import Keys
    from fleet.redisconn import connect
    from fleet.scripts import text
    from governor.incremental import channel_report, split_counts

    keys = Keys(settings.redis_key_prefix)
    client = connect(settings.redis_dsn())
    try:
        bucket = TokenBucket(client, keys, settings)
        snapshot = await bucket.snapshot()
        breaker = await CircuitBreaker(client, keys, settings).status()
        leader_raw = await client.get(keys.governor_leader)
        leader_ttl = await client.pttl(keys.governor_leader)
        workers: dict[str, Any] = {}
        for wid_raw, info_raw in (await client.hgetall(keys.workers)).items():
            wid = text(wid_raw)
            try:
                info = json.loads(info_raw)
            except ValueError:
                info = {}
            ttl = await client.pttl(keys.worker_lease(wid))
            workers[wid] = {
                "session": info.get("session") if isinstance(info, dict) else None,
                "alive": ttl > 0,
                "lease_ms": ttl if ttl > 0 else None,
                "processing": await client.llen(keys.processing(wid)),
            }
        return {
            **snapshot,
            "breaker": {"state": breaker.state.value, "retry_after_s": breaker.retry_after_s},
            "leader": {
                "holder": text(leader_raw).rsplit(":", 1)[0] if leader_raw else None,
                "lease_ms": leader_ttl if leader_ttl > 0 else None,
            },
            "workers": workers,
            "queue": {"name": keys.commands, "length": await client.llen(keys.commands)},
            "dead_letters": await client.llen(keys.dead_letters),
            "channels": await channel_report(client, keys, settings),
            "splits": dict(
                zip(
                    ("commands", "parts_pending", "parts_running"),
                    await split_counts(client, keys),
                    strict=True,
                )
            ),
        }
    finally:
        await client.aclose()


def _window_text(value: str) -> str:
    """``"<K> <W µs>"`` as a person reads it (bucket.lua ignores a value it cannot parse)."""
    window = parse_window(value)
    if window is None:
        return f"{value!r} (own window, unreadable: ignored)"
    return f"{window[0]} per {window[1]:.3g} s (own window, bursts allowed)"


def status_text(r: dict[str, Any]) -> str:
    lines = []
    leader = r["leader"]
    lines.append(
        f"leader: {leader['holder']} (lease {leader['lease_ms']} ms)"
        if leader["holder"]
        else "leader: none (workers keep the last rates)"
    )
    b = r["breaker"]
    extra = f", retry in {b['retry_after_s']:.1f} s" if b["state"] == "open" else ""
    lines.append(f"breaker: {b['state']}{extra}")
    lines.append("rates (per second, burst):")
    for scope, table in r["rates"].items():
        for c, rate in table.items():
            lines.append(f"  {scope}:{c:<8} {rate['per_second']:>8.3g}  burst {rate['burst']}")
    overrides = {
        k.removesuffix(":rate"): v
        for k, v in r["rate_overrides"].items()
        if k.startswith("session:") and k.count(":") == 3 and k.endswith(":rate")
    }
    for name, value in sorted(overrides.items()):
        lines.append(f"  {name:<16} {float(value):>8.3g}  (per-session override)")
    for name, value in sorted(r["rate_overrides"].items()):
        if name.startswith("session:") and name.endswith(":window"):
            lines.append(f"  {name.removesuffix(':window'):<16} {_window_text(str(value))}")
    lines.append("tokens:" + ("" if r["tokens"] else " every bucket full"))
    for name, tokens in r["tokens"].items():
        lines.append(f"  {name:<24} {tokens:>8.3g}")
    lines.append("pauses:" + ("" if r["pauses_s"] else " none"))
    for name, left in r["pauses_s"].items():
        lines.append(f"  {name:<24} {left:>6.1f} s left")
    holds = r.get("holds_s") or {}
    lines.append("fleet holds:" + ("" if holds else " none"))
    for name, left in holds.items():
        lines.append(f"  {name:<24} {left:>6.1f} s left")
    floods = r["recent_floods"]
    lines.append(f"recent floods: {len(floods)}")
    for f in floods[:5]:
        lines.append(f"  {f['session']} {f['request_class']} FLOOD_WAIT_{f['seconds']:g}")
    lines.append(f"workers: {len(r['workers'])}")
    for wid, w in sorted(r["workers"].items()):
        state = f"alive (lease {w['lease_ms']} ms)" if w["alive"] else "DEAD (no heartbeat)"
        lines.append(f"  {wid:<24} session {w['session']}  {state}  holding {w['processing']}")
    lines.append(f"queue {r['queue']['name']}: {r['queue']['length']} commands waiting")
    lines.append(f"dead letters: {r['dead_letters']}")
    sp = r.get("splits") or {}
    if sp.get("commands"):
        lines.append(
            f"split commands: {sp['commands']} ({sp['parts_pending']} parts not over, "
            f"{sp['parts_running']} held by workers)"
        )
    lines.extend(channels_text(r.get("channels") or []))
    return "\n".join(lines)


def _status(settings: GovernorSettings, *, as_json: bool) -> int:
    from fleet.redisconn import REDIS_DOWN

    try:
        report = asyncio.run(gather_status(settings))
    except REDIS_DOWN as exc:
        print(
            f"redis unavailable at {settings.redis_display()}: {type(exc).__name__}",
            file=sys.stderr,
        )
        return Exit.REDIS_UNAVAILABLE
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        print(status_text(report))
    return Exit.OK


# --- channels (the incremental scheduler's active channels) ------------------------------------


def _channels_parser(sub: Any) -> None:
    channels = sub.add_parser("channels", help="manage the incremental scheduler's channels")
    verbs = channels.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="add channels, or change the settings of existing ones")
    add.add_argument("chats", nargs="+", metavar="CHAT")
    add.add_argument(
        "--backfill",
        default=None,
        help="days before today fetched when the channel has no high-water mark, or 'full' "
        "(default PARSER_DEFAULT_BACKFILL_DAYS)",
    )
    add.add_argument(
        "--interval",
        default=None,
        help="seconds between runs (default PARSER_SCHEDULER_INTERVAL_SEC)",
    )
    add.add_argument("--priority", default=0, help="higher runs first (default 0)")
    for verb, text in (
        ("remove", "forget channels (their files and high-water marks stay)"),
        ("pause", "stop scheduling channels, keeping their marks"),
        ("resume", "schedule paused channels again"),
    ):
        verbs.add_parser(verb, help=text).add_argument("chats", nargs="+", metavar="CHAT")
    ls = verbs.add_parser("list", help="the channels, their marks and next runs")
    ls.add_argument("--json", action="store_true", help="one JSON document")


def _channels(settings: GovernorSettings, args: Any) -> int:
    """``channels add|remove|pause|resume|list``; 2 on a bad argument, 1 on an unknown chat."""
    import redis.exceptions

    from governor.channels import Channel

    if args.verb == "add":
        try:
            new = [
                Channel.new(
                    chat,
                    backfill=args.backfill
                    if args.backfill is not None
                    else settings.parser_default_backfill_days,
                    interval=args.interval,
                    priority=args.priority,
                )
                for chat in args.chats
            ]
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.verb != "list":
        from fleet.chats import parse_chat

        for chat in args.chats:
            try:
                parse_chat(chat)
            except ValueError as exc:
                print(f"error: {chat!r}: {exc}", file=sys.stderr)
                return 2
    try:
        return asyncio.run(_channels_io(settings, args, new if args.verb == "add" else []))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        print(
            f"redis unavailable at {settings.redis_display()}: {type(exc).__name__}",
            file=sys.stderr,
        )
        return Exit.REDIS_UNAVAILABLE


async def _channels_io(settings: GovernorSettings, args: Any, new: list[Any]) -> int:
    from dataclasses import replace

    from redis.asyncio import Redis

    from fleet.keys import Keys
    from governor.channels import ChannelStore

    keys = Keys(settings.redis_key_prefix)
    client = Redis.from_url(settings.redis_dsn(), socket_timeout=5, socket_connect_timeout=5)
    try:
        store = ChannelStore(client, keys)
        code = 0
        if args.verb == "add":
            for ch in new:
                old = await store.get(ch.chat)
                if old is not None:  # a change keeps when it was added and whether it is paused
                    ch = replace(ch, added_at=old.added_at, paused=old.paused)
                await store.put(ch)
                print(f"{'changed' if old else 'added'} {ch.chat}")
        elif args.verb == "remove":
            for chat in args.chats:
                if await store.remove(chat):
                    print(f"removed {chat}")
                else:
                    print(f"error: {chat} is not an active channel", file=sys.stderr)
                    code = 1
        elif args.verb in ("pause", "resume"):
            for chat in args.chats:
                if await store.set_paused(chat, args.verb == "pause") is None:
                    print(f"error: {chat} is not an active channel", file=sys.stderr)
                    code = 1
                else:
                    print(f"{args.verb}d {chat}")
        else:
            from governor.incremental import channel_report

            report = await channel_report(client, keys, settings)
            if args.json:
                print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
            else:
                print("\n".join(channels_text(report)))
        return code
    finally:
        await client.aclose()


def channels_text(report: list[dict[str, Any]]) -> list[str]:
    """The channel table of ``channels list`` and ``status``."""
    if not report:
        return ["channels: none"]
    lines = [f"channels: {len(report)}"]
    lines.append(
        f"  {'chat':<24} {'mode':<12} {'mark':>10} {'last success':<20} {'next run':<20} lag"
    )
    for r in report:
        mark = "-" if r["hwm_id"] is None else str(r["hwm_id"])
        lag = "-" if r["lag_s"] is None else f"{r['lag_s']:.0f}s"
        lines.append(
            f"  {r['chat']:<24} {r['mode']:<12} {mark:>10} {r['last_success'] or '-':<20} "
            f"{r['next_run'] or '-':<20} {lag}"
            + (f"  ({r['failures']} failures)" if r.get("failures") else "")
        )
    return lines
