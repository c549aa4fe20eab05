"""``python -m worker demo`` (the README's first command): a local fleet against the simulator.

Starts a private ``redis-server`` on a free loopback port, one governor and three workers (real
OS processes, each claiming its own simulated session), pushes a handful of fetch commands —
several chats, modes and strategies, a duplicate id, a private chat and an invalid command —
prints every event as it arrives, then shows what the governor did (the simulated Telegram's
limits are tighter than the fleet's configured rates, so FloodWaits happen and are absorbed),
each worker's share, the dead letters, stops the fleet with SIGTERM, and prints what was
written. No credentials and no network are needed; process logs go to ``logs/demo/``.
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
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from fleet.events import parse_event
from fleet.keys import Keys
from fleet.redisconn import connect_sync
from worker.cmdline import format_event
from worker.demoreport import files_report, governor_report, outcomes_report
from worker.settings import WorkerSettings

WORKERS = 3
TIMEOUT_S = 180.0
#: The simulated Telegram's hidden limits, tighter than the fleet's defaults (0.9 history
#: requests/s per account, 10/s fleet-wide) so that FloodWaits happen and the governor adapts.
SIM_LIMITS = {
    "SIM_HISTORY_REQUESTS": "6",  # per account: 6 per 10 s = 0.6/s
    "SIM_HISTORY_WINDOW_SECONDS": "10",
    "SIM_FLEET_REQUESTS": "3",  # all accounts together: 3 per 2 s = 1.5/s
    "SIM_FLEET_WINDOW_SECONDS": "2",
}
#: The chats the demo's commands name: its only directories under the data root.
DEMO_CHATS = ("ru_python", "demo_news", "python_jobs", "private_club")


def run_demo(settings: WorkerSettings, data_dir: Path, log_dir: Path = Path("logs/demo")) -> int:
    """Run the demo fleet end to end; 0 when every command ended as expected."""
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
            metrics_port = _start_fleet(procs, _env(url, data_dir, Path(tmp)), Path(tmp), log_dir)
            print(
                f"demo: redis on 127.0.0.1:{port}, a governor and {WORKERS} workers on simulated "
                f"sessions; data in {data_dir}/, logs in {log_dir}/\n"
                f"the governor's metrics, while the demo runs: "
                f"http://127.0.0.1:{metrics_port}/metrics",
                flush=True,
            )
            keys = Keys(settings.redis_key_prefix)
            expected = _push_commands(client, keys)
            outcomes, completed = _follow(client, keys, expected)
            code = outcomes_report(client, keys, outcomes)
            governor_report(url, keys, settings, completed)
        finally:
            _stop(procs, settings.shutdown_grace_seconds)
            redis_proc.terminate()
            redis_proc.wait(10)
    _tidy(data_dir)
    files_report(data_dir)
    print(
        "\nOn a fleet of your own (README, 'Running the fleet'): python -m governor status, "
        "python -m worker status, python -m worker dead-letters, and /metrics on METRICS_PORT."
    )
    return code


def _start_fleet(
    procs: list[subprocess.Popen[bytes]], env: dict[str, str], tmp: Path, log_dir: Path
) -> int:
    """Start the governor (serving its metrics) and the workers into ``procs``; returns the
    governor's metrics port. ``procs`` is the caller's, so a failed start still stops them all."""
    metrics_port = _free_port()
    governor_env = {
        **env,
        "METRICS_MODE": "scrape",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port),
    }
    procs.append(
        _start("governor", [sys.executable, "-m", "governor", "run"], governor_env, log_dir)
    )
    for n in range(1, WORKERS + 1):
        worker_env = {
            **env,
            "WORKER_ID": f"demo-worker-{n}",
            "HEALTH_FILE": str(tmp / f"health-{n}.json"),
        }
        procs.append(
            _start(f"worker-{n}", [sys.executable, "-m", "worker", "run"], worker_env, log_dir)
        )
    return metrics_port


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
            # One command per worker at a time, so the work spreads over the three sessions.
            "PARALLELISM_MAX": "1",
            **SIM_LIMITS,
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
    commands = _demo_commands(datetime.now(UTC).date())
    for payload, _ in commands:
        client.rpush(keys.commands, json.dumps(payload))
        print(f"pushed  {json.dumps(payload)}", flush=True)
    # The same id again: executed once (idempotency), so no second terminal event is awaited.
    client.rpush(keys.commands, json.dumps(commands[0][0]))
    print("pushed  the first command again (same command_id: it runs once)", flush=True)
    return {payload["command_id"]: outcome for payload, outcome in commands}


def _demo_commands(today: date) -> list[tuple[dict[str, Any], str]]:
    """Several chats, modes and strategies, a private chat and an invalid command, each with
    the terminal event the demo expects (one literal table: long, but read whole)."""
    week_ago = today - timedelta(days=7)
    return [
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


def _follow(
    client: redis.Redis, keys: Keys, expected: dict[str, str]
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Print events from the stream until every expected command has its terminal event;
    returns each command's outcome and the ``completed`` events."""
    outcomes: dict[str, str] = {}
    completed: list[dict[str, Any]] = []
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
                if event.get("event") == "completed" and cid not in outcomes:
                    completed.append(event)
                if event.get("event") == "completed" or (
                    event.get("event") == "failed" and not event.get("retryable")
                ):
                    outcomes.setdefault(cid, str(event["event"]))
    return outcomes, completed


def _tidy(data_dir: Path) -> None:
    """Remove what the stopped fleet leaves behind: the lock files of the demo's chats and of
    progress (only when nobody holds them: another fleet could share the data root) and the
    directories of chats that got no file (the private chat)."""
    _unlink_free_lock(data_dir / ".progress.lock")
    for chat in DEMO_CHATS:
        root = data_dir / chat
        if not root.is_dir():
            continue
        for lock in root.rglob(".*.lock"):
            _unlink_free_lock(lock)
        for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if not any(root.iterdir()):
            root.rmdir()


def _unlink_free_lock(path: Path) -> None:
    import fcntl

    try:
        with open(path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held elsewhere: OSError, kept
            path.unlink()
    except OSError:
        pass


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
