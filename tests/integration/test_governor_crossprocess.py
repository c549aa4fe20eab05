"""A FloodWait that is shared holds the other worker process at once and slows it within a
tick; one that belongs to one account's own limit slows that account only.

Real processes on real Redis: two fetching workers on different sessions
(``gate_worker_child.py``: ``TelegramSession`` + ``FleetGate`` over the simulator) and a
``python -m governor`` process. With a simulator prefix per session, lowering ``a``'s
per-account limit through its limits hash floods ``a`` only; with one prefix for both, lowering
the simulator's fleet limit floods whichever sends into the shared window. Rates are measured
from the simulator's request log (one JSON line per request).
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

from fleet.bucket import SHARED_FLOOD_WINDOW_S
from fleet.keys import Keys

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


class Fleet:
    """A governor and two fetching workers (sessions ``a`` and ``b``) over the simulator."""

    def __init__(self, redis_url: str, tmp_path: Path, sim_prefixes: dict[str, str]) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.log = tmp_path / "requests.jsonl"
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
            # A deep cut and no raise (neither additive nor the climb back toward the rate of
            # the last flood, nor slow start), so the effect on the other worker is unmistakable.
            AIMD_DECREASE_FACTOR="0.3",
            AIMD_INCREASE_FRACTION="0",
            AIMD_RECOVERY_MARGIN="0.05",
            AIMD_CUT_COOLDOWN_SECONDS="0.5",
            GOVERNOR_SLOW_START_FACTOR="1",
            GOVERNOR_PROBE_FACTOR="1",
            **{k.upper(): str(v) for k, v in rates.items()},
        )
        self.governor = subprocess.Popen(
            [sys.executable, "-m", "governor"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.workers = []
        for session in ("a", "b"):
            cfg = {
                "session": session,
                "policy": "governor",
                "seconds": 25,
                "redis_url": redis_url,
                "sim_redis_url": redis_url,
                "sim_prefix": sim_prefixes[session],
                "request_log": str(self.log),
                # No per-account limit of the simulator's own (its default, 30 requests per
                # 30 s, would flood b after ~5 s at 6/s): only the ones set at runtime count.
                "settings": {**rates, "sim_history_requests": 0, "sim_resolve_requests": 0},
                "ready_key": "test:ready",
                "latency_ms": 5.0,
            }
            self.workers.append(
                subprocess.Popen(
                    [sys.executable, str(CHILD), json.dumps(cfg)],
                    cwd=tmp_path,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )

    def start(self) -> None:
        for _ in self.workers:
            assert self.client.blpop(["test:ready"], timeout=20) is not None
        # Baseline: b runs steadily at its share of the fleet rate.
        deadline = time.time() + 10
        while True:
            now = time.time()
            rows = read_log(self.log)
            if rows and now - rows[0]["ts"] >= 3 and rate(rows, "b", now - 2, now) >= 4:
                return
            assert now < deadline, "worker b never reached a steady rate"
            time.sleep(0.1)

    def first_flood(self, sessions: tuple[str, ...]) -> float:
        deadline = time.time() + 10
        while True:
            floods = [
                r["ts"]
                for r in read_log(self.log)
                if r["session"] in sessions and r["outcome"] == "flood"
            ]
            if floods:
                return min(floods)
            assert time.time() < deadline, "nobody was flooded"
            time.sleep(0.05)

    def stop(self) -> None:
        procs = [*self.workers, self.governor]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        assert self.governor.returncode == 0


def test_a_shared_flood_holds_the_other_process_at_once_and_slows_the_fleet_within_a_tick(
    redis_url: str, tmp_path: Path
) -> None:
    fleet = Fleet(redis_url, tmp_path, {"a": "simf:", "b": "simf:"})
    try:
        fleet.start()
        rows = read_log(fleet.log)
        now = time.time()
        before = rate(rows, "a", now - 2, now) + rate(rows, "b", now - 2, now)
        # The simulator's fleet-wide window, shared by both accounts, drops to 4 per second.
        fleet.client.hset(
            "simf:sim:{sim}:limits", mapping={"fleet_requests": 4, "fleet_window_seconds": 1}
        )
        t_flood = fleet.first_flood(("a", "b"))
        # Judged shared once SHARED_FLOOD_WINDOW_S has passed, on the next tick.
        settle = SHARED_FLOOD_WINDOW_S + TICK_S
        time.sleep(max(0.0, t_flood + settle + 2.2 - time.time()))
        rows = read_log(fleet.log)
        after = rate(rows, "a", t_flood + settle, t_flood + settle + 2) + rate(
            rows, "b", t_flood + settle, t_flood + settle + 2
        )
        assert before >= 8, before
        # 0.3 × the measured fleet rate (~12/s) is ~3.6/s for both together.
        assert after <= 0.6 * before, (before, after)
        flooded = {r["session"] for r in rows if r["outcome"] == "flood" and r["ts"] >= t_flood}
        assert flooded == {"a", "b"}, "a shared window floods both accounts"
        # The fleet hold (set by the second account's flood, min(N, FLOOD_FLEET_HOLD_SECONDS)
        # = 1 s): for a moment after it, neither sends, not even on a slot booked before.
        first = rows_first(rows, t_flood)
        second = min(
            r["ts"]
            for r in rows
            if r["outcome"] == "flood" and r["ts"] >= t_flood and r["session"] != first
        )
        sent = [r["ts"] - second for r in rows if r["outcome"] == "ok"]
        assert not [t for t in sent if 0.05 <= t < 0.9], sent
    finally:
        fleet.stop()


def rows_first(rows: list[dict[str, Any]], t_flood: float) -> str:
    return next(r["session"] for r in rows if r["outcome"] == "flood" and r["ts"] == t_flood)


def test_a_flood_of_one_accounts_own_limit_slows_that_account_not_the_other_process(
    redis_url: str, tmp_path: Path
) -> None:
    fleet = Fleet(redis_url, tmp_path, {"a": "sima:", "b": "simb:"})
    try:
        fleet.start()
        # The simulator floods a only: its account may now send 1 history request per second.
        fleet.client.hset(
            "sima:sim:{sim}:limits", mapping={"history_requests": 1, "history_window_seconds": 1}
        )
        t_flood = fleet.first_flood(("a",))
        # Long enough for a to be refused again below the pace it kept before its first flood
        # (cut to 0.3 x ~5.5/s, it is still above 1/s): that is its own limit too.
        span = 6.0
        time.sleep(max(0.0, t_flood + span - time.time()) + 0.2)
        rows = read_log(fleet.log)
        before = rate(rows, "b", t_flood - 2.0, t_flood)
        after = rate(rows, "b", t_flood, t_flood + span)
        assert before >= 4, before
        floods_a = [r["ts"] for r in rows if r["session"] == "a" and r["outcome"] == "flood"]
        assert len(floods_a) >= 2, floods_a
        # b is neither held nor cut: it keeps (at least) its pace, taking a's unused share.
        assert after >= 0.85 * before, (before, after)
        fleet_rate = fleet.client.hget(Keys().rates, "fleet:history:rate")
        assert fleet_rate is None or float(fleet_rate) >= 12.0, "a's own floods cut the fleet"
        assert not any(r["session"] == "b" and r["outcome"] == "flood" for r in rows)
        held = [r["ts"] - t_flood for r in rows if r["session"] == "b"]
        assert [t for t in held if 0.05 <= t < 0.95], "b was held by a's own flood"
        own = fleet.client.hget(Keys().rates, "session:a:history:rate")
        assert own is not None and float(own) < 10.0, "a's own rate was not cut"
    finally:
        fleet.stop()
