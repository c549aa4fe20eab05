"""What ``python -m worker demo`` prints once its commands are done: each command's outcome and
the dead letters, what the governor did (FloodWaits absorbed, rates, each worker's share), and
the files written. Read-only: it looks at the demo's Redis and data root, changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from fleet.bucket import TokenBucket
from fleet.keys import Keys
from worker.settings import WorkerSettings


def outcomes_report(client: redis.Redis, keys: Keys, outcomes: dict[str, str]) -> int:
    expected = {
        "demo-ru-python": "completed",
        "demo-news-week": "completed",
        "demo-legacy-form": "completed",
        "demo-private": "failed",
        "demo-invalid": "failed",
    }
    print()
    ok = True
    for cid, want in expected.items():
        got = outcomes.get(cid, "no terminal event")
        mark = "ok " if got == want else "!! "
        ok = ok and got == want
        print(f"{mark} {cid:<18} expected {want:<9} got {got}")
    # The dead letters themselves: the demo's Redis is gone once it ends, so no command to run.
    dead = [json.loads(raw) for raw in client.lrange(keys.dead_letters, 0, -1)]
    print(f"\ndead letters: {len(dead)}")
    for letter in dead:
        error = letter.get("error") or {}
        reason = error.get("message") if isinstance(error, dict) else error
        print(f"  {letter.get('command_id', '?')}: {reason or letter.get('reason', letter)}")
    return 0 if ok else 1


def governor_report(
    url: str, keys: Keys, settings: WorkerSettings, completed: list[dict[str, Any]]
) -> None:
    """What the governor did: FloodWaits absorbed, the rates it settled on, each worker's share."""
    import asyncio

    async def read() -> tuple[dict[str, Any], list[Any]]:
        client = aioredis.Redis.from_url(url)
        try:
            bucket = TokenBucket(client, keys, settings)
            return await bucket.snapshot(), await bucket.recent_floods(settings.flood_events_max)
        finally:
            await client.aclose()

    snapshot, flood_events = asyncio.run(read())
    _floods_and_rates(snapshot, flood_events)
    _shares(completed)


def _floods_and_rates(snapshot: dict[str, Any], flood_events: list[Any]) -> None:
    """The FloodWaits the fleet absorbed and the rates the governor settled on."""
    floods = len(flood_events)
    counters = snapshot["counters"]
    history = snapshot["rates"]
    print("\nwhat the governor did (the simulated Telegram allows 0.6 history requests/s per")
    print("account and 1.5/s for the whole fleet; the fleet starts at 0.9/s and 10/s):")
    by_session: dict[str, int] = {}
    for flood in flood_events:
        by_session[flood.session] = by_session.get(flood.session, 0) + 1
    per_session = ", ".join(f"{name} {n}" for name, n in sorted(by_session.items()))
    print(
        f"  FloodWaits absorbed: {floods} (by session: {per_session or 'none'}); "
        "every command still completed, none failed for it"
        if floods
        else "  FloodWaits: none (the limits did not bind this time)"
    )
    admits = counters.get("history:admits", 0)
    print(f"  history requests admitted by the shared bucket: {admits}")
    fleet = history["fleet"]["history"]
    account = history["session"]["history"]
    print(
        f"  rates settled on: fleet {fleet['per_second']:.2f}/s (burst {fleet['burst']}), "
        f"per account {account['per_second']:.2f}/s (burst {account['burst']})"
    )
    overrides = {
        k.split(":")[1]: float(v)
        for k, v in snapshot["rate_overrides"].items()
        if k.startswith("session:") and k.endswith(":history:rate") and k.count(":") == 3
    }
    if overrides:
        print("  per-session rates the governor set:")
    for name, rate in sorted(overrides.items()):
        print(f"    {name}: {rate:.2f}/s")


def _shares(completed: list[dict[str, Any]]) -> None:
    """Each worker's share of the completed commands and of their messages."""
    shares: dict[str, list[int]] = {}
    for event in completed:
        share = shares.setdefault(str(event.get("worker_id")), [0, 0])
        share[0] += 1
        share[1] += int(event.get("processed") or 0)
    total = sum(messages for _, messages in shares.values()) or 1
    print("  each worker's share:")
    for wid, (commands, messages) in sorted(shares.items()):
        print(
            f"    {wid}: {commands} commands, {messages} messages ({100 * messages / total:.0f}%)"
        )


def files_report(data_dir: Path) -> None:
    files = sorted(data_dir.rglob("discussions_*.json"))
    total = sum(json.loads(p.read_text())["message_count"] for p in files)
    print(f"\n{len(files)} day files, {total} messages, under {data_dir}/:")
    for path in files:
        print(f"  {path}")
