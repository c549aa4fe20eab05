"""Restarts: a worker killed with -9 and restarted on the same host takes its dead
predecessor's session and worker id at once (not after the leases' TTLs), and a worker waiting
for a free session keeps its health file fresh."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(
        redis_url,
        data_dir,
        tmp_path,
        SIM_SESSIONS="sim-1",  # one session: the restarted worker needs that very one
        SESSION_LEASE_SECONDS=30,
        WORKER_LEASE_SECONDS=10,
        WORKER_ID="w-fixed",  # supervisord restarts a program under the same id
        SIM_LATENCY_MS=30,
    )


def test_a_worker_restarted_after_kill_9_serves_again_at_once(fleet: Fleet, rv: RedisView) -> None:
    [w0] = fleet.start(1)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-20", command_id="long"))
    wait_for(lambda: rv.processing("w-fixed"), 20, "the command taken")
    w0.kill()  # -9: both leases stay in Redis with their full TTL
    restarted = time.monotonic()
    [w1] = fleet.start(
        1, wait_ready=False, SIM_LATENCY_MS=0
    )  # the take-over is tested, not its pace
    wait_for(lambda: w1.ready() or w1.proc.poll() is not None, 20, "restarted worker ready")
    ready_s = time.monotonic() - restarted
    assert w1.proc.poll() is None, w1.log()
    assert ready_s < 8, f"ready after {ready_s:.1f}s"  # not SESSION_LEASE_SECONDS=30
    assert "taking it over" in w1.log()
    done = wait_for(
        lambda: [e for e in rv.by_kind("completed") if e["command_id"] == "long"],
        40,
        "the killed command completed by the restarted worker",
    )
    assert len(done) == 1 and len(done[0]["files"]) == 20
    assert not rv.dead_letters()


def test_a_worker_waiting_for_a_session_keeps_its_health_file_fresh(fleet: Fleet) -> None:
    fleet.start(1)
    [waiting] = fleet.start(1, wait_ready=False, SESSION_WAIT_SECONDS=0.3)
    first = wait_for(
        lambda: (d := waiting.health_data()) and d.get("status") == "waiting_session" and d,
        20,
        "waiting_session",
    )
    mtime = waiting.health.stat().st_mtime_ns
    wait_for(lambda: waiting.health.stat().st_mtime_ns > mtime, 5, "a fresh health file")
    assert waiting.health_data()["status"] == "waiting_session", first
    waiting.signal(signal.SIGTERM)
    assert waiting.wait(10) == 0
