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
        }
    finally:
        await client.aclose()


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
