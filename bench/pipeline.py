"""Pipeline benchmark: simulator → real Telethon client → finished day files, one worker.

Compares, in the same run and on the same simulated history (simulator limits off):

* ``fetcher`` — this project's path: ``TelegramSession.iter_history`` pages → ``Fetcher`` →
  ``DayStore`` (journal per page, dedup, progress checkpoints, atomic merge into day files);
* ``naive`` — the baseline most scripts use: Telethon ``iter_messages`` into one list, then one
  ``json.dump`` per day (no atomic write, no dedup, no progress, no resume). It maps messages
  with the same ``message_to_dict`` and also passes ``wait_time=0``, so the comparison is
  between the pipelines, not Telethon's default one-second pause between pages.

Each (pipeline, size) runs in a fresh child process so that its peak RSS (``ru_maxrss``) is its
own. Usage::

    python bench/pipeline.py --sizes 10000,100000 --out bench/results/pipeline.json
    python bench/pipeline.py --sizes 10000,100000,1000000 --out FILE.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MESSAGES_PER_DAY = 20_000
CHAT = "@bench_chat"
PIPELINES = ("naive", "fetcher")


def _settings(data_dir: Path, per_day: int = MESSAGES_PER_DAY) -> Any:
    from worker.sim.settings import SimSettings

    start = (datetime.now(UTC) - timedelta(days=400)).date()
    return SimSettings(
        telegram_backend="sim",
        sim_messages_per_day=per_day,
        sim_empty_day_ratio=0.0,
        sim_history_start=start.isoformat(),
        sim_history_requests=0,
        sim_resolve_requests=0,
        data_dir=data_dir,
        log_level="WARNING",
    )


async def _days_for(session: Any, size: int) -> tuple[date, date]:
    """The first consecutive days of the simulated chat that hold at least ``size`` messages."""
    from telethon import utils

    from fleet.chats import parse_chat

    resolved = await session.resolve(parse_chat(CHAT))
    bare, _ = utils.resolve_id(resolved.peer_id)
    world = session.client.sim.world
    total, day = 0, 0
    while total < size:
        total += world.day_count(bare, day)
        day += 1
    first = world.start.date()
    return first, first + timedelta(days=day - 1)


async def _child(
    pipeline: str, size: int, data_dir: Path, per_day: int = MESSAGES_PER_DAY
) -> dict[str, Any]:
    from zoneinfo import ZoneInfo

    from worker.sim.client import sim_client_factory
    from worker.telegram import TelegramSession

    settings = _settings(data_dir, per_day)
    session = TelegramSession(settings, "bench", client_factory=sim_client_factory(settings))
    await session.connect()
    try:
        first, last = await _days_for(session, size)
        started = time.perf_counter()
        if pipeline == "fetcher":
            count = await _run_fetcher(session, settings, first, last)
        else:
            count = await _run_naive(session, settings, first, last, ZoneInfo("UTC"))
        seconds = time.perf_counter() - started
        # Every getHistory the simulator answered: paging plus the per-day completeness proof.
        history = int(session.client.sim.requests.get("messages.GetHistory", 0))
    finally:
        await session.close()
    files = list(data_dir.rglob("discussions_*.json"))  # noqa: ASYNC240 (after the timing)
    return {
        "pipeline": pipeline,
        "size": size,
        "messages": count,
        "days": (last - first).days + 1,
        "history_requests": history,
        "requests_per_day": history / ((last - first).days + 1),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "seconds": seconds,
        "msgs_per_s": count / seconds if seconds else 0.0,
        "us_per_msg": seconds / count * 1e6 if count else 0.0,
    }


async def _run_fetcher(session: Any, settings: Any, first: date, last: date) -> int:
    from worker.commands import CommandLimits, parse_command
    from worker.fetch import Fetcher
    from worker.storage import store_from_settings

    payload = {"command": "fetch", "chat": CHAT, "mode": "range", "strategy": "batch"}
    payload.update({"from": first.isoformat(), "to": last.isoformat()})
    today = datetime.now(UTC).date()
    cmd = parse_command(json.dumps(payload), CommandLimits(today=today, max_range_days=100_000))
    fetcher = Fetcher(session, store_from_settings(settings), tz=settings.tz)
    outcome = await fetcher.run(cmd)
    assert not outcome.days_failed and len(outcome.days_completed) == len(cmd.days)
    return outcome.processed


async def _run_naive(session: Any, settings: Any, first: date, last: date, tz: Any) -> int:
    """Everything into one list, then one json.dump per day."""
    from fleet.chats import parse_chat
    from worker.mapping import message_to_dict

    client = session.client
    entity = await client.get_input_entity(parse_chat(CHAT).lookup)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    messages = []
    async for m in client.iter_messages(entity, reverse=True, offset_date=start, wait_time=0):
        if m.date >= end:
            break
        messages.append(m)
    by_day: dict[date, list[dict[str, Any]]] = {}
    for m in messages:
        by_day.setdefault(m.date.astimezone(tz).date(), []).append(message_to_dict(m, CHAT))
    for day, items in by_day.items():
        path = settings.data_dir / "bench_chat" / str(day.year) / f"discussions_{day}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Blocking on purpose: this is what the naive scripts do.
        with open(path, "w", encoding="utf-8") as fh:  # noqa: ASYNC230
            json.dump({"chat": CHAT, "date": str(day), "messages": items}, fh, ensure_ascii=False)
    return len(messages)


def _run_child(pipeline: str, size: int, per_day: int = MESSAGES_PER_DAY) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", pipeline, "--size", str(size)]
        cmd += ["--messages-per-day", str(per_day)]
        cmd += ["--data-dir", str(Path(tmp) / "data"), "--out", str(out)]
        proc = subprocess.Popen(cmd, cwd=tmp)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{pipeline} at {size} failed with exit {proc.returncode}")
        result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/pipeline.json")
    parser.add_argument("--messages-per-day", type=int, default=MESSAGES_PER_DAY)
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        from loguru import logger

        logger.remove()
        result = asyncio.run(_child(args.child, args.size, args.data_dir, args.messages_per_day))
        args.out.write_text(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = [_run_child(p, n, args.messages_per_day) for n in sizes for p in PIPELINES]
    _print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "pipeline",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "messages_per_day": args.messages_per_day,
        "results": rows,
        "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'pipeline':<9} {'messages':>9} {'days':>5} {'req/day':>7} {'seconds':>8} "
    head += f"{'msgs/s':>9} "
    head += f"{'us/msg':>7} {'peak RSS MB':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['pipeline']:<9} {r['messages']:>9} {r['days']:>5} "
            f"{r.get('requests_per_day', 0):>7.1f} {r['seconds']:>8.2f} "
            f"{r['msgs_per_s']:>9.0f} {r['us_per_msg']:>7.1f} {r['peak_rss_mb']:>11.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
