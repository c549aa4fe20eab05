"""Helpers for the daemon's integration tests: real ``python -m worker`` subprocesses against a
real redis-server, events read back from the events stream, polling with deadlines (never
sleep-and-hope)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis as syncredis

from fleet.keys import Keys

ROOT = Path(__file__).resolve().parents[2]


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str = "condition", every: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def base_env(redis_url: str, data_dir: Path, tmp: Path, **extra: object) -> dict[str, str]:
    """Environment of a simulator worker: fast, deterministic, no credentials."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "LOG_"))
    }
    env.update(
        {
            "REDIS_URL": redis_url,
            "TELEGRAM_BACKEND": "sim",
            "DATA_DIR": str(data_dir),
            "SESSIONS_DIR": str(tmp / "sessions"),
            "SIM_SESSIONS": "sim-1,sim-2,sim-3",
            "SIM_HISTORY_REQUESTS": "0",
            "SIM_RESOLVE_REQUESTS": "0",
            "SIM_MESSAGES_PER_DAY": "150",
            "SIM_SEED": "7",
            "RATE_LIMIT_STRATEGY": "off",
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "INFO",
            "METRICS_MODE": "off",
            "WORKER_LEASE_SECONDS": "2",
            "RECOVERY_INTERVAL_SECONDS": "0.3",
            # How long an idle worker may take to notice a stop (it never cancels a pop).
            "COMMAND_POP_TIMEOUT_SECONDS": "0.2",
            "SESSION_WAIT_SECONDS": "0.5",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "PROGRESS_EVENT_INTERVAL_SECONDS": "0",
            "COMMAND_RETRY_BASE_SECONDS": "0.2",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Worker:
    """One ``python -m worker`` process with its own log file and health file."""

    def __init__(self, env: dict[str, str], tmp: Path, name: str, *args: str) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.health = tmp / f"{name}.health"
        env = {**env, "HEALTH_FILE": str(self.health)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=env,
            cwd=tmp,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health_data(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.health.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def ready(self) -> bool:
        data = self.health_data()
        return bool(data and data.get("status") in ("idle", "busy"))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Fleet:
    """Workers started by one test, all stopped at its end."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.workers: list[Worker] = []

    def start(self, n: int = 1, *, wait_ready: bool = True, **extra: object) -> list[Worker]:
        env = {**self.env, **{k: str(v) for k, v in extra.items()}}
        started = [Worker(env, self.tmp, f"w{len(self.workers) + i}") for i in range(n)]
        self.workers.extend(started)
        if wait_ready:
            for w in started:
                wait_for(lambda w=w: w.ready() or w.proc.poll() is not None, 30, f"{w.name} ready")
                assert w.proc.poll() is None, w.log()
        return started

    def stop_all(self, timeout: float = 20) -> list[int]:
        for w in self.workers:
            w.signal(signal.SIGTERM)
        codes = []
        for w in self.workers:
            try:
                codes.append(w.wait(timeout))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(-9)
        for w in self.workers:
            w.close()
        return codes


class RedisView:
    """Synchronous view of the fleet's Redis for assertions."""

    def __init__(self, url: str, prefix: str = "") -> None:
        self.client = syncredis.Redis.from_url(url)
        self.keys = Keys(prefix)

    def push(self, *commands: dict[str, Any] | bytes | str) -> None:
        for c in commands:
            raw = c if isinstance(c, bytes | str) else json.dumps(c)
            self.client.rpush(self.keys.commands, raw)

    def events(self) -> list[dict[str, Any]]:
        """Every event in the stream, oldest first (tolerates Redis being down: [])."""
        try:
            entries = self.client.xrange(self.keys.events_stream)
        except (syncredis.ConnectionError, syncredis.TimeoutError):
            return []
        return [json.loads(fields[b"event"]) for _id, fields in entries]

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == kind]

    def completed_ids(self) -> set[str]:
        return {e["command_id"] for e in self.by_kind("completed")}

    def queue(self) -> list[Any]:
        return list(self.client.lrange(self.keys.commands, 0, -1))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.client.lrange(self.keys.dead_letters, 0, -1)]

    def processing(self, worker_id: str) -> list[Any]:
        return list(self.client.lrange(self.keys.processing(worker_id), 0, -1))

    def close(self) -> None:
        self.client.close()


def day_files(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Every day file under ``data_dir`` (relative path -> JSON), without what describes the
    run rather than the data: ``fetched_at``, and how completeness was proven (a batch proves a
    day by the next day's first message, a per-day fetch by asking for the day's end; a proof
    may need resumes). The proven facts (``server_last_id``, ``missing_ids``) stay."""
    out = {}
    for path in sorted(data_dir.rglob("discussions_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("fetched_at", None)
        proof = data.get("completeness")
        if isinstance(proof, dict):
            proof.pop("method", None)
            proof.pop("resumed", None)
        out[str(path.relative_to(data_dir))] = data
    return out


def all_files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path


def fetch(chat: str, day_from: str, day_to: str | None = None, **extra: Any) -> dict[str, Any]:
    if day_to is None:
        cmd: dict[str, Any] = {"command": "fetch", "chat": chat, "mode": "date", "date": day_from}
    else:
        cmd = {"command": "fetch", "chat": chat, "mode": "range", "from": day_from, "to": day_to}
    cmd.update(extra)
    return cmd
