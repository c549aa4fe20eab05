"""Operator subcommands (issue 3, points 9 and 10): send, listen, status, dead-letters, check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import ROOT, Fleet, RedisView, base_env, fetch, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return base_env(redis_url, tmp_path / "data", tmp_path, HEALTH_FILE=tmp_path / "health")


def cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_send_validates_pushes_and_prints_the_id(env: dict[str, str], rv: RedisView) -> None:
    out = cli(
        env,
        "send",
        "--chat",
        "@ru_python",
        "--from",
        "2025-03-01",
        "--to",
        "2025-03-02",
        "--strategy",
        "per_day",
        "--limit",
        "10",
    )
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip()
    [raw] = rv.queue()
    cmd = json.loads(raw)
    assert cmd["command_id"] == cid and cmd["mode"] == "range" and cmd["limit"] == 10
    bad = cli(env, "send", "--chat", "../etc", "--date", "2025-03-01")
    assert bad.returncode == 2 and "invalid" in bad.stderr
    assert len(rv.queue()) == 1


def test_send_wait_and_listen_follow_a_command_to_its_end(
    env: dict[str, str], rv: RedisView, tmp_path: Path
) -> None:
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        listener = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "listen",
                "--replay",  # whether it starts before or after the first event, it sees all
                "1000",
                "--command-id",
                "op-1",
                "--until-terminal",
                "--timeout",
                "30",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sent = cli(
            env,
            "send",
            "--chat",
            "@ru_python",
            "--date",
            "2025-03-01",
            "--command-id",
            "op-1",
            "--wait",
            "--timeout",
            "30",
        )
        assert sent.returncode == 0, sent.stderr
        lines = sent.stdout.strip().splitlines()
        assert lines[0] == "op-1" and "completed" in lines[-1]
        out, _ = listener.communicate(timeout=30)
        assert listener.returncode == 0
        assert out.strip().splitlines()[0].split()[1] == "started"
        assert "completed" in out.strip().splitlines()[-1]
        replay = cli(
            env,
            "listen",
            "--replay",
            "50",
            "--json",
            "--command-id",
            "op-1",
            "--until-terminal",
            "--timeout",
            "5",
        )
        events = [json.loads(ln) for ln in replay.stdout.splitlines()]
        assert events[0]["event"] == "started" and events[-1]["event"] == "completed"
    finally:
        fleet.stop_all()


def test_listen_for_a_command_that_already_ended_prints_its_events_and_exits(
    env: dict[str, str], rv: RedisView, tmp_path: Path
) -> None:
    """`send` then `listen --until-terminal` used to wait forever when the command ended
    before `listen` subscribed."""
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        sent = cli(
            env, "send", "--chat", "@ru_python", "--date", "2025-03-01", "--command-id", "op-2"
        )
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: "op-2" in rv.completed_ids(), 30, "op-2 completed")
        begun = time.monotonic()
        late = cli(env, "listen", "--command-id", "op-2", "--until-terminal", "--timeout", "20")
        assert late.returncode == 0, late.stderr
        lines = late.stdout.strip().splitlines()
        assert "started" in lines[0] and "completed" in lines[-1]
        assert time.monotonic() - begun < 15
    finally:
        fleet.stop_all()


def test_status_shows_queue_workers_sessions_and_dead_letters(
    env: dict[str, str], rv: RedisView, tmp_path: Path
) -> None:
    fleet = Fleet(env, tmp_path)
    try:
        [w] = fleet.start(1)
        rv.push(b"not json")
        wait_for(lambda: rv.dead_letters(), 10)
        fleet.workers[0].signal()
        w.wait(15)
        rv.push(fetch("@ru_python", "2025-03-01"))
        out = cli(env, "status")
        assert out.returncode == 0, out.stderr
        assert "1 commands waiting" in out.stdout and "dead letters: 1" in out.stdout
        report = json.loads(cli(env, "status", "--json").stdout)
        assert report["queue"]["length"] == 1 and report["dead_letters"] == 1
    finally:
        fleet.stop_all()
    live = Fleet(env, tmp_path)
    try:
        [w2] = live.start(1)
        report = json.loads(cli(env, "status", "--json").stdout)
        wid = w2.health_data()["worker_id"]  # type: ignore[index]
        assert report["workers"][wid]["alive"]
        assert any(s for s in report["sessions"])
    finally:
        live.stop_all()


def test_dead_letters_lists_and_requeues(env: dict[str, str], rv: RedisView) -> None:
    from fleet.deadletters import new_dead_letter
    from fleet.keys import Keys

    letter = new_dead_letter(
        b'{"command":"fetch"}',
        reason="'chat' is required",
        error_type="CommandRejected",
        command_id=None,
        chat=None,
        worker_id="w",
        source="validation",
    )
    rv.client.lpush(Keys("").dead_letters, letter.to_json(1 << 20))
    listed = cli(env, "dead-letters")
    assert (
        listed.returncode == 0
        and letter.id in listed.stdout
        and "'chat' is required" in (listed.stdout)
    )
    as_json = [json.loads(ln) for ln in cli(env, "dead-letters", "--json").stdout.splitlines()]
    assert as_json[0]["payload"] == '{"command":"fetch"}'
    requeued = cli(env, "dead-letters", "--requeue", letter.id)
    assert requeued.returncode == 0, requeued.stderr
    assert rv.queue() == [b'{"command":"fetch"}'] and not rv.dead_letters()
    assert cli(env, "dead-letters", "--requeue", letter.id).returncode == 1


def test_check_follows_the_health_file(env: dict[str, str], tmp_path: Path) -> None:
    health = tmp_path / "health"
    assert cli(env, "check").returncode == 1  # no worker
    fleet = Fleet(env, tmp_path)
    try:
        [w] = fleet.start(1)
        assert cli({**env, "HEALTH_FILE": str(w.health)}, "check").returncode == 0
        data = json.loads(w.health.read_text())
        assert {"status", "ts", "current", "worker_id"} <= set(data)
    finally:
        fleet.stop_all()
    health.write_text(json.dumps({"status": "idle", "ts": "2020-01-01T00:00:00Z"}))
    old = time.time() - 120
    os.utime(health, (old, old))
    stale = cli(env, "check")
    assert stale.returncode == 1 and "stale" in stale.stderr
    health.write_text(json.dumps({"status": "redis_down"}))
    assert cli(env, "check").returncode == 1
