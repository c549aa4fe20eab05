"""A FloodWait in one worker process holds the other at once and slows it within one tick.

Real processes on real Redis: two fetching workers on different sessions
(``gate_worker_child.py``: ``TelegramSession`` + ``FleetGate`` over the simulator) and a
``python -m governor`` process. The simulator of session ``a`` keeps its limits under a prefix
of its own, so lowering ``a``'s per-account limit through the limits hash floods ``a`` only.
Rates are measured from the simulator's request log (one JSON line per request).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
TICK_S = 0.5
CHILD = Path(__file__).with_name("gate_worker_child.py")

pytestmark = pytest.mark.slow


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            rows.append(json.loads(line))
    return [r for r in rows if r["method"] == "messages.GetHistory"]


def rate(rows: list[dict[str, Any]], session: str, t0: float, t1: float) -> float:
    n = sum(1 for r in rows if r["session"] == session and t0 <= r["ts"] < t1)
    return n / (t1 - t0)


def test_a_flood_in_one_worker_holds_the_other_and_slows_it_within_one_tick(
    redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "requests.jsonl"
    # Both sessions may send 10/s; the fleet 12/s binds: each gets about 6/s.
    rates = {
        "rate_history_per_second": 10.0,
        "rate_history_burst": 1,
        "fleet_rate_history_per_second": 12.0,
        "fleet_rate_history_burst": 1,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GOVERNOR_"))}
    env.update(
        REDIS_URL=redis_url,
        GOVERNOR_ID="gov-x",
        GOVERNOR_TICK_SECONDS=str(TICK_S),
        GOVERNOR_LEASE_SECONDS="2",
        METRICS_MODE="off",
        LOG_FORMAT="console",
        PYTHONPATH=str(ROOT),
        # A deep cut and no raise (neither additive nor the climb back toward the rate of the
        # last flood), so the effect on the other worker is unmistakable.
        AIMD_DECREASE_FACTOR="0.3",
        AIMD_INCREASE_FRACTION="0",
        AIMD_RECOVERY_MARGIN="0.05",
        AIMD_CUT_COOLDOWN_SECONDS="0.5",
        **{k.upper(): str(v) for k, v in rates.items()},
    )
    governor = subprocess.Popen(
        [sys.executable, "-m", "governor"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers = []
    for session in ("a", "b"):
        cfg = {
            "session": session,
            "policy": "governor",
            "seconds": 25,
            "redis_url": redis_url,
            "sim_redis_url": redis_url,
            "sim_prefix": f"sim{session}:",
            "request_log": str(log),
            # No per-account limit of the simulator's own (its default, 30 requests per 30 s,
            # would flood b after ~5 s at 6/s): only the one set on a at runtime counts.
            "settings": {**rates, "sim_history_requests": 0, "sim_resolve_requests": 0},
            "ready_key": "test:ready",
            "latency_ms": 5.0,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, str(CHILD), json.dumps(cfg)],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    try:
        for _ in workers:
            assert client.blpop(["test:ready"], timeout=20) is not None
        # Baseline: b runs steadily at its share of the fleet rate.
        deadline = time.time() + 10
        while True:
            now = time.time()
            rows = read_log(log)
            if rows and now - rows[0]["ts"] >= 3 and rate(rows, "b", now - 2, now) >= 4:
                break
            assert now < deadline, "worker b never reached a steady rate"
            time.sleep(0.1)
        # The simulator floods a: its account may now send 1 history request per second.
        client.hset(
            "sima:sim:{sim}:limits",
            mapping={"history_requests": 1, "history_window_seconds": 1},
        )
        deadline = time.time() + 10
        while not any(r["session"] == "a" and r["outcome"] == "flood" for r in read_log(log)):
            assert time.time() < deadline, "a was never flooded"
            time.sleep(0.05)
        t_flood = min(
            r["ts"] for r in read_log(log) if r["session"] == "a" and r["outcome"] == "flood"
        )
        time.sleep(max(0.0, t_flood + TICK_S + 2.0 - time.time()) + 0.2)
        rows = read_log(log)
        before = rate(rows, "b", t_flood - 2.0, t_flood)
        after = rate(rows, "b", t_flood + TICK_S, t_flood + TICK_S + 2.0)
        assert before >= 4, before
        # 0.3 × the measured fleet rate (~12/s) is ~3.6/s for both together.
        assert after <= 0.75 * before, (before, after)
        assert not any(r["session"] == "b" and r["outcome"] == "flood" for r in rows)
        # The fleet hold: for min(N, FLOOD_FLEET_HOLD_SECONDS) = 1 s after a's flood, b sends
        # nothing, not even on a slot it had booked before (a request already in flight then
        # lands within a few ms).
        held = [r["ts"] - t_flood for r in rows if r["session"] == "b"]
        assert not [t for t in held if 0.05 <= t < 0.95], held
        assert [t for t in held if 0.95 <= t < 2.0], "b did not resume after the hold"
    finally:
        for p in [*workers, governor]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*workers, governor]:
            try:
                p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    assert governor.returncode == 0
