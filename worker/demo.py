"""``python -m worker demo`` (the README's first command): a local fleet against the simulator.

Starts a private ``redis-server`` on a free loopback port, one governor and three workers (real
OS processes, each claiming its own simulated session), pushes a handful of fetch commands —
several chats, modes and strategies, a duplicate id, a private chat and an invalid command —
prints every event as it arrives, stops the fleet with SIGTERM, and prints what was written.
No credentials and no network are needed; process logs go to ``logs/demo/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from fleet.events import parse_event
from fleet.keys import Keys
from fleet.redisconn import connect_sync
from worker.cmdline import format_event
from worker.settings import WorkerSettings

WORKERS = 3
TIMEOUT_S = 120.0


def run_demo(settings: WorkerSettings, data_dir: Path, log_dir: Path = Path("logs/demo")) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        print("demo: redis-server is not installed; `make demo` installs it", file=sys.stderr)
        return 69
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tg-demo-") as tmp:
        port = _free_port()
        redis_proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = _wait_for_redis(url)
            env = _env(url, data_dir, Path(tmp))
            procs.append(
                _start("governor", [sys.executable, "-m", "governor", "run"], env, log_dir)
            )
            for n in range(1, WORKERS + 1):
                worker_env = {
                    **env,
                    "WORKER_ID": f"demo-worker-{n}",
                    "HEALTH_FILE": str(Path(tmp) / f"health-{n}.json"),
                }
                procs.append(
                    _start(
                        f"worker-{n}", [sys.executable, "-m", "worker", "run"], worker_env, log_dir
                    )
                )
            print(
                f"demo: redis on 127.0.0.1:{port}, a governor and {WORKERS} workers on simulated "
                f"sessions; data in {data_dir}/, logs in {log_dir}/",
                flush=True,
            )
            expected = _push_commands(client, Keys(settings.redis_key_prefix))
            outcomes = _follow(client, Keys(settings.redis_key_prefix), expected)
            code = _report(client, Keys(settings.redis_key_prefix), outcomes, data_dir)
        finally:
            _stop(procs, settings.shutdown_grace_seconds)
            redis_proc.terminate()
            redis_proc.wait(10)
    return code


def _env(url: str, data_dir: Path, tmp: Path) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "HEALTH_"))
    }
    keep.update(
        {
            "REDIS_URL": url,
            "TELEGRAM_BACKEND": "sim",
            "SIM_SESSIONS": ",".join(f"demo-{n}" for n in range(1, WORKERS + 1)),
            "SESSIONS_DIR": str(tmp / "sessions"),
            "DATA_DIR": str(data_dir.resolve()),
            "METRICS_MODE": "off",
            "WORKER_LEASE_SECONDS": "3",
            "PROGRESS_EVENT_INTERVAL_SECONDS": "1",
            "GOVERNOR_TICK_SECONDS": "1",
        }
    )
    return keep


def _start(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path
) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed when the process ends
    try:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child has its own descriptor


def _push_commands(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """Push the demo's commands; returns command id → what the demo expects of it."""
    today = datetime.now(UTC).date()
    week_ago = today - timedelta(days=7)
    commands: list[tuple[dict[str, Any], str]] = [
        (
            {
                "command": "fetch",
                "chat": "@ru_python",
                "mode": "days",
                "days": 3,
                "strategy": "batch",
                "command_id": "demo-ru-python",
            },
            "completed",
        ),
        (
            {
                "command": "fetch",
                "chat": "https://t.me/demo_news",
                "mode": "range",
                "from": str(week_ago),
                "to": str(today - timedelta(days=1)),
                "strategy": "per_day",
                "command_id": "demo-news-week",
            },
            "completed",
        ),
        (
            {
                "command": "fetch",
                "chat": "python_jobs",
                "days_back": 1,
                "limit": 100,
                "strategy": "auto",
                "command_id": "demo-legacy-form",
            },
            "completed",
        ),
        (
            {
                "command": "fetch",
                "chat": "@private_club",
                "mode": "days",
                "days": 1,
                "command_id": "demo-private",
            },
            "failed",
        ),
        (
            {
                "command": "fetch",
                "chat": "../../etc/passwd",
                "mode": "days",
                "days": 1,
                "command_id": "demo-invalid",
            },
            "failed",
        ),
    ]
    for payload, _ in commands:
        client.rpush(keys.commands, json.dumps(payload))
        print(f"pushed  {json.dumps(payload)}", flush=True)
    # The same id again: executed once (idempotency), so no second terminal event is awaited.
    client.rpush(keys.commands, json.dumps(commands[0][0]))
    print("pushed  the first command again (same command_id: it runs once)", flush=True)
    return {payload["command_id"]: outcome for payload, outcome in commands}


def _follow(client: redis.Redis, keys: Keys, expected: dict[str, str]) -> dict[str, str]:
    """Print events from the stream until every expected command has its terminal event."""
    outcomes: dict[str, str] = {}
    last_id = "0-0"
    deadline = time.monotonic() + TIMEOUT_S
    while len(outcomes) < len(expected) and time.monotonic() < deadline:
        reply: Any = client.xread({keys.events_stream: last_id}, block=500, count=100)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = parse_event(fields.get(b"event", b""))
                if event is None:
                    continue
                print(format_event(event, False), flush=True)
                cid = str(event.get("command_id"))
                if event.get("event") == "completed" or (
                    event.get("event") == "failed" and not event.get("retryable")
                ):
                    outcomes.setdefault(cid, str(event["event"]))
    return outcomes


def _report(client: redis.Redis, keys: Keys, outcomes: dict[str, str], data_dir: Path) -> int:
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
    files = sorted(data_dir.rglob("discussions_*.json"))
    total = sum(json.loads(p.read_text())["message_count"] for p in files)
    print(f"\n{len(files)} day files, {total} messages, under {data_dir}/:")
    for path in files:
        print(f"  {path}")
    print(f"dead letters: {client.llen(keys.dead_letters)} (python -m worker dead-letters)")
    return 0 if ok else 1


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    codes = ", ".join(str(p.returncode) for p in procs)
    print(f"fleet stopped with SIGTERM (exit codes {codes})")


def _wait_for_redis(url: str) -> redis.Redis:
    client = connect_sync(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
