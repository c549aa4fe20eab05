"""End to end: a simulator worker and a governor as real processes, exporting metrics to a real
Pushgateway and on ``/metrics``; the group of a worker killed with SIGKILL is deleted by the
governor within one worker lease (three heartbeat intervals)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as syncredis

from fleet.keys import Keys
from fleet.metrics import FETCH_JOB, GOVERNOR_JOB, WORKER_JOB
from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for
from tests.integration.obs_harness import (
    GOVERNOR_METRICS,
    WORKER_METRICS,
    GovernorProc,
    get,
    governor_env,
    samples,
    scrape,
    wait_leading,
)
from tests.pushgateway import Pushgateway
from tests.redis_server import free_port

LEASE_S = 1.5  # heartbeat every 0.5 s: "3 heartbeat intervals" is one lease
TICK_S = 0.2
PUSH_S = 0.3


@pytest.fixture
def env(redis_url: str, tmp_path: Path, gateway: Pushgateway) -> dict[str, str]:
    return base_env(
        redis_url,
        tmp_path / "data",
        tmp_path,
        LOG_FORMAT="json",
        METRICS_MODE="both",
        METRICS_HOST="127.0.0.1",
        PUSHGATEWAY_URL=gateway.url,
        PUSH_INTERVAL_SECONDS=PUSH_S,
        WORKER_LEASE_SECONDS=LEASE_S,
        RATE_LIMIT_STRATEGY="adaptive",  # the shared gate: token waits, breaker
        # Every request still books a token (token_wait_seconds counts them), but an account's
        # own pace (default 0.9 history requests/s) does not stretch the command to seconds.
        RATE_HISTORY_PER_SECOND=20,
        SIM_FAULT_RATE="0.3",  # some transient faults (RPC 500, no slow timeouts): retries_total
        SIM_FAULTS="rpc500",
        BACKOFF_BASE_SECONDS="0.05",  # retried soon: the delays' length is not tested here
        CIRCUIT_BREAKER_FAILURE_THRESHOLD="100",  # ... that do not open the breaker
        SIM_SEED="11",
    )


@pytest.fixture
def fleet_env(env: dict[str, str]) -> dict[str, str]:
    return env


@pytest.fixture
def governor(redis_url: str, tmp_path: Path, gateway: Pushgateway) -> Iterator[GovernorProc]:
    port = free_port()
    gov = GovernorProc(
        governor_env(
            redis_url,
            "gov-obs",
            GOVERNOR_TICK_SECONDS=TICK_S,
            WORKER_LEASE_SECONDS=LEASE_S,
            METRICS_MODE="both",
            METRICS_HOST="127.0.0.1",
            METRICS_PORT=port,
            PUSHGATEWAY_URL=gateway.url,
            PUSH_INTERVAL_SECONDS=PUSH_S,
        ),
        tmp_path,
    )
    gov.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        wait_leading(gov)
        yield gov
    finally:
        gov.stop()
        gov.close()


def _one_command(rv: RedisView, command_id: str) -> dict[str, Any]:
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-03", command_id=command_id))
    wait_for(lambda: command_id in rv.completed_ids(), 20, "command completed")
    return next(e for e in rv.by_kind("completed") if e["command_id"] == command_id)


def _pushed_value(group: dict[str, Any], name: str) -> float:
    metric = group.get(name) or {}
    return sum(float(m.get("value", 0)) for m in metric.get("metrics", []))


def test_run_metrics_reach_the_pushgateway_and_a_killed_workers_group_is_reaped(
    fleet: Fleet, governor: GovernorProc, gateway: Pushgateway, redis_url: str
) -> None:
    (worker,) = fleet.start(1, WORKER_ID="obs-w1", METRICS_PORT=free_port())
    rv = RedisView(redis_url)
    try:
        _one_command(rv, "obs-push-1")
    finally:
        rv.close()
    # The run's values arrive with the next push, under {job, instance=<worker_id>}.
    ok_line = 'commands_total{instance="obs-w1",job="telegram-fetcher-worker",status="ok"} 1'
    wait_for(lambda: ok_line in gateway.metrics_text(), 5, "the command's metrics pushed")
    groups = gateway.groups()
    assert groups["obs-w1"]["labels"] == {"job": WORKER_JOB, "instance": "obs-w1"}
    assert groups["gov-obs"]["labels"] == {"job": GOVERNOR_JOB, "instance": "gov-obs"}
    assert _pushed_value(groups["obs-w1"], "messages_fetched_total") > 0

    # SIGKILL: the worker cannot delete its own group; the governor does once the lease is gone.
    client = syncredis.Redis.from_url(redis_url)
    try:
        left_ms = client.pttl(Keys().worker_lease("obs-w1"))
    finally:
        client.close()
    killed = time.monotonic()
    worker.kill()
    wait_for(lambda: "obs-w1" not in gateway.groups(), 3 * LEASE_S, "group deleted", every=0.02)
    elapsed = time.monotonic() - killed
    since_heartbeat = elapsed + (LEASE_S - left_ms / 1000)
    print(
        f"\nSIGKILL -> group deleted: {elapsed:.2f}s "
        f"({since_heartbeat:.2f}s after the last heartbeat; lease {LEASE_S}s, tick {TICK_S}s)"
    )
    # The lease (three heartbeat intervals) expires 2 to 3 intervals after the kill, and the
    # governor wakes at that expiry rather than at its next tick: the group goes within three
    # heartbeat intervals, plus the Pushgateway's DELETE and this test's polling.
    assert elapsed <= left_ms / 1000 + 0.25, (elapsed, left_ms)
    assert elapsed <= LEASE_S + 0.25, elapsed
    assert since_heartbeat <= LEASE_S + 0.25, since_heartbeat
    assert "gov-obs" in gateway.groups()  # only the dead worker's group went
    # The governor counts the deletion right after the DELETE returns: wait for that too.
    wait_for(
        lambda: any(
            s.name == "pushgateway_groups_deleted_total" and s.value >= 1
            for s in samples(scrape(governor.url), "pushgateway_groups_deleted")  # type: ignore[attr-defined]
        ),
        2,
        "the governor's deletion counter",
    )


def test_metrics_of_worker_and_governor_parse_and_name_every_metric_after_one_command(
    fleet: Fleet, governor: GovernorProc, redis_url: str
) -> None:
    port = free_port()
    fleet.start(1, WORKER_ID="obs-w2", METRICS_PORT=port)
    rv = RedisView(redis_url)
    try:
        completed = _one_command(rv, "obs-scrape-1")
    finally:
        rv.close()
    worker_url = f"http://127.0.0.1:{port}"
    families = scrape(worker_url)
    assert set(families) >= WORKER_METRICS, WORKER_METRICS - set(families)
    gov_families = scrape(governor.url)  # type: ignore[attr-defined]
    assert set(gov_families) >= GOVERNOR_METRICS, GOVERNOR_METRICS - set(gov_families)

    def value(name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` (e.g. ``x_total``, ``x_count``) with ``labels``."""
        return sum(
            s.value
            for family in families.values()
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("messages_fetched_total") == completed["processed"] > 0
    assert value("commands_total", status="ok") == 1
    assert value("fetch_duration_seconds_count", chat="@ru_python") == 1
    lag = value("fetch_lag_seconds", chat="@ru_python")
    end_of_range = datetime(2025, 3, 4, tzinfo=UTC).timestamp()  # the last day is complete
    assert abs(lag - (time.time() - end_of_range)) < 60, lag
    assert value("token_wait_seconds_count", request_class="history") >= 5
    assert value("breaker_state", component="telegram") == 0
    assert value("retries_total") >= 1  # the simulator's transient faults were retried
    assert {s.labels["target"] for s in samples(families, "retries") if s.labels} <= {
        "telegram_history",
        "telegram_resolve",
        "telegram_other",
        "redis_publish",
    }
    assert "command_queue_length" in {s.name for s in samples(families, "command_queue_length")}
    assert value("live_workers") == 0  # a worker does not export the governor's gauges
    assert sum(s.value for s in samples(gov_families, "live_workers")) == 1

    def gov(name: str, **labels: str) -> float:
        return sum(
            s.value
            for family in gov_families.values()
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    # The leader samples its bucket: the gauges carry real values, not their initial zeros.
    assert gov("bucket_rate_per_second", request_class="history") > 0
    assert gov("bucket_tokens", request_class="resolve") > 0  # idle enough to hold tokens
    assert gov("governor_leader") == 1
    status, body = get(f"{governor.url}/health")  # type: ignore[attr-defined]
    assert status == 200, body
    status, body = get(f"{governor.url}/health/details")  # type: ignore[attr-defined]
    gov_details = json.loads(body)
    assert gov_details["redis"] == {"ok": True} and gov_details["leading"] is True

    # Health: 200 and the details of seed 003.
    status, body = get(f"{worker_url}/health")
    assert status == 200, body
    status, body = get(f"{worker_url}/health/details")
    details = json.loads(body)
    assert status == 200 and details["healthy"] is True
    assert details["telegram"] == {"connected": True, "session": "sim-1"}
    assert details["redis"] == {"ok": True}
    assert details["breaker"] == "closed"
    assert details["version"]
    assert details["last_success"] is not None
    assert details["last_command"]["command_id"] == "obs-scrape-1"
    assert details["current_command"] is None


def test_one_shot_fetch_pushes_its_metrics_and_keeps_its_group(
    gateway: Pushgateway, tmp_path: Path, redis_url: str
) -> None:
    env = base_env(
        redis_url,
        tmp_path / "data",
        tmp_path,
        METRICS_MODE="push",
        PUSHGATEWAY_URL=gateway.url,
        PUSH_INTERVAL_SECONDS=PUSH_S,
        WORKER_ID="cron-1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "fetch", "--chat", "@ru_python", "--date", "2025-03-01"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    group = gateway.groups()["cron-1"]  # kept after exit: the last run's values stay visible
    assert group["labels"] == {"job": FETCH_JOB, "instance": "cron-1"}
    assert _pushed_value(group, "messages_fetched_total") > 0
    assert _pushed_value(group, "commands_total") == 1
