"""Graceful shutdown (issue 3, point 7): SIGTERM during a long command, a second signal, and an
idle worker. Real subprocesses and real signals."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for

pytestmark = pytest.mark.slow
GRACE_S = 10


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(redis_url, data_dir, tmp_path, SHUTDOWN_GRACE_SECONDS=GRACE_S)


def _complete_days(data_dir: Path, chat: str) -> set[str]:
    try:
        progress = json.loads((data_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return set()
    days = progress.get("chats", {}).get(chat, {})
    return {day for day, entry in days.items() if entry.get("complete")}


def test_sigterm_during_a_long_command_requeues_it_and_a_new_worker_resumes(
    fleet: Fleet, rv: RedisView, data_dir: Path
) -> None:
    [w] = fleet.start(1, SIM_LATENCY_MS=60)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-30", command_id="long"))
    wait_for(lambda: len(_complete_days(data_dir, "ru_python")) >= 3, 30, "3 days complete")
    w.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert w.wait(GRACE_S + 5) == 0
    stop_s = time.monotonic() - asked
    assert stop_s < GRACE_S
    done_before = _complete_days(data_dir, "ru_python")
    assert 3 <= len(done_before) < 30
    [queued] = rv.queue()  # back at the head, with its id
    assert json.loads(queued)["command_id"] == "long"
    kinds = [e["event"] for e in rv.events() if e["command_id"] == "long"]
    assert "failed" not in kinds and "completed" not in kinds  # nothing false published
    assert "stopped (SIGTERM), exit 0" in w.log()
    stamps = {
        day: (data_dir / "ru_python" / "2025" / f"discussions_{day}.json").stat().st_mtime_ns
        for day in done_before
    }

    fleet.start(1, SIM_LATENCY_MS=0)
    done = wait_for(
        lambda: next((e for e in rv.by_kind("completed") if e["command_id"] == "long"), None), 30
    )
    assert len(done["files"]) == 30
    total = sum(
        json.loads((data_dir.parent / rel).read_text())["message_count"] for rel in done["files"]
    )
    assert 0 < done["processed"] < total  # resumed, not started over
    for day, stamp in stamps.items():  # completed days were not fetched again
        path = data_dir / "ru_python" / "2025" / f"discussions_{day}.json"
        assert path.stat().st_mtime_ns == stamp
    print(f"SIGTERM -> exit: {stop_s:.2f}s; days complete before: {len(done_before)}/30")


def test_second_signal_stops_at_once_and_files_stay_valid(
    fleet: Fleet, rv: RedisView, data_dir: Path
) -> None:
    [w] = fleet.start(1, SIM_LATENCY_MS=4000)  # a page takes 4 s: the first signal waits
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-05", command_id="slow"))
    wait_for(lambda: rv.by_kind("started"), 10)
    w.signal(signal.SIGTERM)
    time.sleep(1.1)  # a repeat within 1 s is ignored (process managers send doubles)
    assert w.proc.poll() is None
    w.signal(signal.SIGTERM)
    second = time.monotonic()
    assert w.wait(GRACE_S) == 0
    assert time.monotonic() - second < 3
    assert [json.loads(q)["command_id"] for q in rv.queue()] == ["slow"]
    for path in data_dir.rglob("*.json"):
        json.loads(path.read_text())  # whole files only


def test_idle_worker_stops_quickly_and_releases_everything(fleet: Fleet, rv: RedisView) -> None:
    [w] = fleet.start(1)
    wid = w.health_data()["worker_id"]  # type: ignore[index]
    session = w.health_data()["session"]  # type: ignore[index]
    w.signal(signal.SIGINT)
    asked = time.monotonic()
    assert w.wait(10) == 0
    assert time.monotonic() - asked < 3
    assert not rv.client.exists(rv.keys.worker_lease(wid))
    assert not rv.client.exists(rv.keys.session_lease(session))
    assert not rv.client.hexists(rv.keys.workers, wid)
    assert not w.health.exists()
