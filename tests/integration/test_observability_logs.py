"""The worker's logs end to end: JSON lines with the context fields, ``command_id`` on every line
of a command, DEBUG steps, shutdown lines; a log server that is down costs no throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, Worker, base_env, fetch, wait_for
from tests.integration.obs_harness import samples, scrape
from tests.redis_server import free_port

ALWAYS = {"ts", "level", "message", "service", "environment", "worker_id", "component", "logger"}
#: Loggers whose every line is work done for a command (the daemon's own lines are checked by
#: their events).
COMMAND_LOGGERS = (
    "worker.fetch",
    "worker.executor",
    "worker.terminal",
    "worker.storage",
    "worker.daywriter",
    "worker.journal",
    "worker.partrun",
    "worker.progress",
    "worker.fleet_gate",
)
#: The daemon's lifecycle, split by stage: during a command, their lines carry its id too.
DAEMON_LOGGERS = (
    "worker.daemon",
    "worker.startup",
    "worker.heartbeat",
    "worker.intake",
    "worker.shutdown",
    "worker.status",
)


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return base_env(
        redis_url,
        tmp_path / "data",
        tmp_path,
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        METRICS_MODE="scrape",
        METRICS_HOST="127.0.0.1",
        RATE_LIMIT_STRATEGY="adaptive",
    )


@pytest.fixture
def fleet_env(env: dict[str, str]) -> dict[str, str]:
    return env


def _lines(worker: Worker) -> list[dict[str, Any]]:
    out = []
    for raw in worker.log().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            raise AssertionError(f"not a JSON line: {raw!r}") from None
    return out


def _run_one(fleet: Fleet, redis_url: str, command: dict[str, Any], **extra: object) -> Worker:
    """Start a worker, run ``command`` to completion, stop the worker cleanly."""
    port = free_port()
    (worker,) = fleet.start(1, wait_ready=True, METRICS_PORT=port, **extra)
    worker.metrics_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    rv = RedisView(redis_url)
    try:
        rv.push(command)
        cid = command["command_id"]
        wait_for(lambda: cid in rv.completed_ids(), 30, f"{cid} completed")
    finally:
        rv.close()
    return worker


def test_every_line_is_json_and_every_line_of_a_command_carries_its_id(
    fleet: Fleet, redis_url: str
) -> None:
    cmd = fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="log-1", strategy="per_day")
    worker = _run_one(fleet, redis_url, cmd)
    worker.signal()
    assert worker.wait(15) == 0
    lines = _lines(worker)
    for line in lines:
        assert set(line) >= ALWAYS, line
        assert line["service"] == "telegram-fetcher" and line["worker_id"]
    events = {line.get("event") for line in lines}
    # The DEBUG steps of seed 001, the summary, the shutdown.
    assert {
        "command_received",
        "command_parsed",
        "telegram_connect",
        "telegram_connected",
        "day_opened",
        "day_written",
        "command_started",
        "command_completed",
        "shutdown_started",
        "shutdown_completed",
    } <= events, events
    assert any(
        line["logger"] == "worker.daywriter" and "ms" in line["message"] for line in lines
    ), "file write timings"

    first = next(i for i, line in enumerate(lines) if line.get("event") == "command_parsed")
    last = next(i for i, line in enumerate(lines) if line.get("event") == "command_completed")
    during = lines[first : last + 1]
    ours = [
        line
        for line in during
        if line["logger"].startswith(COMMAND_LOGGERS) or line["logger"] in DAEMON_LOGGERS
    ]
    assert len(ours) > 10
    for line in ours:
        # per_day runs each day in its own task and storage in threads: the id follows them.
        assert line.get("command_id") == "log-1", line
        assert line.get("chat") == "@ru_python" and line.get("mode") == "range", line

    summary = lines[last]
    assert summary["duration_ms"] >= 0
    assert summary["processed"] > 0 and summary["message_count"] >= summary["processed"]
    assert summary["total"] == 2 and summary["days_done"] == 2
    shutdown = next(line for line in lines if line.get("event") == "shutdown_completed")
    assert shutdown["last_command_id"] == "log-1" and shutdown["waited_seconds"] >= 0
    assert shutdown["last_command_status"] == "ok"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_log_server_that_is_down_costs_no_throughput_and_memory_stays_bounded(
    fleet: Fleet, redis_url: str, tmp_path: Path
) -> None:
    # A fixed command with many pages (DEBUG: several records per page).
    def command(cid: str) -> dict[str, Any]:
        return fetch("@ru_python", "2025-03-01", "2025-03-06", command_id=cid)

    common = {
        "SIM_MESSAGES_PER_DAY": 2000,
        "LOG_QUEUE_MAX_RECORDS": 200,
        "RATE_LIMIT_STRATEGY": "off",  # measure the worker, not the bucket's pacing
    }
    base = _run_one(fleet, redis_url, command("tp-none"), DATA_DIR=tmp_path / "d-none", **common)
    base_rss = _rss_kb(base.pid)
    base.signal()  # one worker at a time: the next command must run in the next worker
    assert base.wait(15) == 0
    closed = free_port()  # nothing listens here
    down = _run_one(
        fleet,
        redis_url,
        command("tp-down"),
        DATA_DIR=tmp_path / "d-down",
        LOKI_URL=f"http://127.0.0.1:{closed}",
        **common,
    )
    down_rss = _rss_kb(down.pid)
    families = scrape(down.metrics_url)  # type: ignore[attr-defined]
    down.signal()
    assert down.wait(15) == 0

    def summary(worker: Worker) -> dict[str, Any]:
        return next(line for line in _lines(worker) if line.get("event") == "command_completed")

    fast, slow = summary(base), summary(down)
    assert fast["processed"] == slow["processed"] > 5000
    rate_none = fast["processed"] / (fast["duration_ms"] / 1000)
    rate_down = slow["processed"] / (slow["duration_ms"] / 1000)
    print(
        f"\nthroughput: no log server {rate_none:.0f} msg/s ({fast['duration_ms']} ms), "
        f"Loki down {rate_down:.0f} msg/s ({slow['duration_ms']} ms); "
        f"RSS {base_rss // 1024} MiB vs {down_rss // 1024} MiB"
    )
    assert slow["duration_ms"] <= 1.5 * fast["duration_ms"] + 500
    # Bounded: the queue holds at most LOG_QUEUE_MAX_RECORDS; the rest is dropped and counted.
    assert down_rss - base_rss < 30 * 1024
    dropped = [
        s.value for s in samples(families, "log_records_dropped") if s.name.endswith("_total")
    ]
    assert sum(dropped) > 0
    # No loop: the shipper reports the outage once, and nothing of the HTTP client is logged.
    down_lines = _lines(down)
    shipper_lines = [line for line in down_lines if line["logger"].startswith("governor.log")]
    # (two shippers: the worker sets logging up again once it knows its worker id)
    assert len(shipper_lines) <= 4, [line["message"] for line in shipper_lines]
    assert not [line for line in down_lines if line["logger"].startswith(("urllib", "http."))]
    assert abs(len(down_lines) - len(_lines(base))) <= 10
