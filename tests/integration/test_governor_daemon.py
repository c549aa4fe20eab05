"""``python -m governor`` as real processes: one leader, failover, recovery, status, exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fleet.keys import Keys
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TICK_S = 0.2
LEASE_S = 1.0


def governor_env(redis_url: str, gid: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "GOVERNOR_", "SCHEDULE_", "AIMD_", "METRICS_"))
    }
    env.update(
        REDIS_URL=redis_url,
        GOVERNOR_ID=gid,
        GOVERNOR_TICK_SECONDS=str(TICK_S),
        GOVERNOR_LEASE_SECONDS=str(LEASE_S),
        METRICS_MODE="off",
        LOG_FORMAT="console",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


@pytest.fixture
def start_governor(
    redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(gid: str, **extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "governor"],
            cwd=tmp_path,
            env=governor_env(redis_url, gid, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def leader(client: redis.Redis) -> str | None:
    raw = client.get(Keys().governor_leader)
    return raw.decode().rsplit(":", 1)[0] if raw else None


def test_one_governor_leads_and_another_takes_over_after_kill_9(
    redis_url: str, start_governor: Callable[..., subprocess.Popen[bytes]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    procs = {gid: start_governor(gid) for gid in ("gov-a", "gov-b")}
    first = wait_for(lambda: leader(client), 15, "a leader")
    assert first in procs
    # Exactly one leads, and keeps leading while alive (renewals, not re-elections).
    t_end = time.monotonic() + 3 * LEASE_S
    while time.monotonic() < t_end:
        assert leader(client) == first
        time.sleep(0.05)
    procs[str(first)].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    other = "gov-b" if first == "gov-a" else "gov-a"
    wait_for(lambda: leader(client) == other, LEASE_S + TICK_S + 1.0, "the standby to lead")
    assert time.monotonic() - killed_at <= LEASE_S + TICK_S + 1.0


def test_sigterm_stops_within_the_grace_period_with_exit_0_and_hands_over(
    redis_url: str, start_governor: Callable[..., subprocess.Popen[bytes]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    proc = start_governor("gov-a", SHUTDOWN_GRACE_SECONDS="5")
    wait_for(lambda: leader(client) == "gov-a", 15, "gov-a to lead")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr.decode()
    assert time.monotonic() - t0 < 5
    assert leader(client) is None  # released, a standby need not wait for the TTL


def test_bad_configuration_exits_78_with_one_line(tmp_path: Path) -> None:
    env = governor_env("redis://127.0.0.1:1/0", "x", SCHEDULE_DAILY_AT="25:00")
    proc = subprocess.run(
        [sys.executable, "-m", "governor"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SCHEDULE_DAILY_AT" in lines[0]


def test_leader_recovers_dead_workers_commands_and_pushes_the_schedule(
    redis_url: str, start_governor: Callable[..., subprocess.Popen[bytes]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    cmd = json.dumps({"command": "fetch", "chat": "@x_chat", "command_id": "c-1"})
    client.hset(keys.workers, "w-dead", json.dumps({"session": "s1"}))
    client.rpush(keys.processing("w-dead"), cmd)  # no lease: its heartbeat expired
    client.hset(keys.workers, "w-live", json.dumps({"session": "s2"}))
    client.set(keys.worker_lease("w-live"), "tok", px=30_000)
    client.rpush(keys.processing("w-live"), "held")
    start_governor("gov-a", SCHEDULE_CHATS="@ru_python", SCHEDULE_DAILY_AT="00:00")

    def queued() -> list[str]:
        return [x.decode() for x in client.lrange(keys.commands, 0, -1)]

    wait_for(lambda: len(queued()) == 2, 15, "the recovered and the scheduled command")
    ids = sorted(json.loads(x).get("command_id") for x in queued())
    assert ids[0] == "c-1" and ids[1].startswith("sched:ru_python:")
    assert not client.hexists(keys.workers, "w-dead")
    assert client.lrange(keys.processing("w-live"), 0, -1) == [b"held"]
    time.sleep(3 * TICK_S)
    assert len(queued()) == 2  # the schedule pushes once


def test_leader_dead_letters_a_poison_command_and_publishes_its_failed_event(
    redis_url: str, start_governor: Callable[..., subprocess.Popen[bytes]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    cmd = json.dumps({"command": "fetch", "chat": "@poison_chat", "command_id": "c-poison"})
    client.hset(keys.deliveries, "c-poison", 2)  # it already killed two workers
    client.hset(keys.workers, "w-dead", json.dumps({"session": "s1"}))
    client.rpush(keys.processing("w-dead"), cmd)
    start_governor("gov-a", COMMAND_MAX_DELIVERIES="3")

    def failed_events() -> list[dict[str, object]]:
        entries = client.xrange(keys.events_stream)
        events = [json.loads(fields[b"event"]) for _, fields in entries]
        return [e for e in events if e.get("event") == "failed"]

    events = wait_for(failed_events, 15, "the poison command's failed event")
    assert isinstance(events, list) and len(events) == 1
    event = events[0]
    assert event["command_id"] == "c-poison" and event["chat"] == "@poison_chat"
    assert event["retryable"] is False and event["worker_id"] == "gov-a"
    assert event["error"]["type"] == "PoisonCommand"  # type: ignore[index]
    assert client.llen(keys.commands) == 0 and client.llen(keys.dead_letters) == 1


def test_status_prints_rates_tokens_pauses_breaker_workers_and_queue(
    redis_url: str, start_governor: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    client.hset(keys.rates, "fleet:history:rate", "7.5")
    client.hset(keys.rates, "session:bob:history:window", "30 29500000")
    client.set(keys.pause("alice", "history"), str(10**18), px=60_000)
    client.hset(keys.workers, "w-1", json.dumps({"session": "alice"}))
    client.set(keys.worker_lease("w-1"), "tok", px=30_000)
    client.rpush(keys.commands, "{}", "{}")
    start_governor("gov-a")
    wait_for(lambda: leader(client) == "gov-a", 15, "gov-a to lead")
    env = governor_env(redis_url, "status")
    text = subprocess.run(
        [sys.executable, "-m", "governor", "status"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "leader: gov-a" in text
    assert "breaker: closed" in text
    assert "fleet:history" in text and "7.5" in text
    assert "alice:history" in text  # the pause
    assert "session:bob:history 30 per 29.5 s (own window" in text
    assert "w-1" in text and "alive" in text
    assert "tg_commands: 2 commands waiting" in text
    report = json.loads(
        subprocess.run(
            [sys.executable, "-m", "governor", "status", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    assert report["rates"]["fleet"]["history"]["per_second"] == 7.5
    assert report["queue"]["length"] == 2 and report["breaker"]["state"] == "closed"


def test_governor_rides_out_a_redis_restart_and_exits_69_after_the_max_outage(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """The governor shares the worker's outage tracker: one log line when Redis goes, one when
    it is back, leadership taken again, and exit 69 once an outage outlasts the maximum."""
    env = governor_env(private_redis.url, "gov-o", REDIS_MAX_OUTAGE_SECONDS="3")
    log = tmp_path / "governor.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "governor"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis.from_url(private_redis.url)
        wait_for(lambda: leader(client) == "gov-o", 15, "gov-o to lead")
        private_redis.kill()
        time.sleep(1.0)  # shorter than the maximum outage
        private_redis.start()
        client = redis.Redis.from_url(private_redis.url)
        wait_for(lambda: "reachable again" in log.read_text(), 15, "the governor to see Redis back")
        wait_for(lambda: leader(client) == "gov-o", 15, "gov-o to lead again")
        assert proc.poll() is None
        killed = time.monotonic()  # before: killing a container returns after the drop is seen
        private_redis.kill()
        code = proc.wait(20)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    out = log.read_text()
    assert code == 69, out
    assert 3 <= took < 12, out
    assert out.count("unreachable (") == 2, out  # one line per outage
    assert out.count("reachable again") == 1, out
    assert "redis unavailable for 3s; exiting" in out
