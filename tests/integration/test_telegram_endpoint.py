"""TELEGRAM_DC and bounded waits, with the real Telethon client and real processes.

A local TCP endpoint that accepts and never answers (:mod:`tests.integration.blackhole`) is both
proof that ``TELEGRAM_DC`` is honoured (the connection arrives there, not at Telegram) and the
hung server the bounded waits are for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from telethon.sessions import SQLiteSession

from fleet.exitcodes import Exit
from tests.integration.blackhole import BlackHole
from tests.integration.daemon_harness import Fleet, RedisView, Worker, fetch, wait_for

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0


def telethon_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "PUSHGATEWAY_", "METRICS_", "LOKI_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        TELEGRAM_BACKEND="telethon",
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH="0123456789abcdef0123456789abcdef",
        TELEGRAM_DC=f"2@127.0.0.1:{port}",
        TELEGRAM_REQUEST_TIMEOUT_SECONDS=str(TIMEOUT_S),
        SESSIONS_DIR=str(tmp_path / "sessions"),
        DATA_DIR=str(tmp_path / "data"),
        LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def new_session(tmp_path: Path, name: str) -> Path:
    """A session file as ``login`` starts it: no auth key yet, Telethon's default DC."""
    directory = tmp_path / "sessions"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.session"
    session = SQLiteSession(str(path))
    session.save()
    session.close()
    return path


def run_worker(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    """Run ``python -m worker ARGS``; (exit code, stderr+stdout, monotonic time at exit)."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr + proc.stdout, time.monotonic()


def test_fetch_against_a_server_that_never_answers_fails_within_twice_the_timeout(
    tmp_path: Path,
) -> None:
    new_session(tmp_path, "acct")
    with BlackHole() as hole:
        env = telethon_env(tmp_path, hole.port, TELEGRAM_SESSION="acct")
        code, output, ended = run_worker(
            ["fetch", "--chat", "@some_chat", "--date", "2025-11-01"], env, tmp_path
        )
    assert hole.arrivals, f"the client never reached TELEGRAM_DC: {output}"
    assert hole.received > 0  # it sent its handshake there
    waited = ended - hole.arrivals[0]
    assert code != Exit.OK, output
    assert waited <= 2 * TIMEOUT_S, f"waited {waited:.1f}s: {output}"
    assert "TIMEOUT" in output
    assert "Traceback" not in output


def test_login_goes_to_the_configured_endpoint_and_gives_up_in_time(tmp_path: Path) -> None:
    with BlackHole() as hole:
        env = telethon_env(tmp_path, hole.port, TELEGRAM_PHONE="+15550000000")
        code, output, ended = run_worker(["login", "--session", "fresh"], env, tmp_path)
    assert hole.arrivals, f"login never reached TELEGRAM_DC: {output}"
    assert code != Exit.OK
    assert ended - hole.arrivals[0] <= 2 * TIMEOUT_S, output
    assert "login failed" in output and "TIMEOUT" in output
    session = SQLiteSession(str(tmp_path / "sessions" / "fresh.session"))
    try:  # the session remembers the endpoint, so the next login goes there too
        assert (session.dc_id, session.server_address, session.port) == (
            2,
            "127.0.0.1",
            hole.port,
        )
    finally:
        session.close()


@pytest.mark.parametrize(
    "value", ["127.0.0.1:443", "2@127.0.0.1", "x@host:1", "2@host:port", "2@a b:1"]
)
def test_a_malformed_telegram_dc_is_a_readable_config_error(tmp_path: Path, value: str) -> None:
    env = telethon_env(tmp_path, 1, TELEGRAM_DC=value, TELEGRAM_SESSION="acct")
    code, output, _ = run_worker(["fetch", "--chat", "@c", "--date", "2025-11-01"], env, tmp_path)
    assert code == Exit.CONFIG, output
    assert "TELEGRAM_DC" in output and "ID@HOST:PORT" in output
    assert "Traceback" not in output


# --- the daemon --------------------------------------------------------------------------------


def _health_ts(worker: Worker) -> str | None:
    return (worker.health_data() or {}).get("ts")


def test_daemon_facing_a_hung_endpoint_keeps_its_heartbeat_and_keeps_retrying(
    fleet: Fleet, rv: RedisView, tmp_path: Path
) -> None:
    new_session(tmp_path, "acct")
    with BlackHole() as hole:
        raw = json.dumps(fetch("@ru_python", "2025-03-01", command_id="c-hung"))
        rv.push(raw)
        [w] = fleet.start(
            1,
            wait_ready=False,
            TELEGRAM_BACKEND="telethon",
            TELEGRAM_API_ID="12345",
            TELEGRAM_API_HASH="0123456789abcdef0123456789abcdef",
            TELEGRAM_SESSION="acct",
            TELEGRAM_DC=f"2@127.0.0.1:{hole.port}",
            TELEGRAM_REQUEST_TIMEOUT_SECONDS=TIMEOUT_S,
            BACKOFF_BASE_SECONDS=0.1,
            BACKOFF_MAX_SECONDS=0.2,
        )
        wait_for(lambda: w.log().count("telegram connect failed") >= 2, 20, "two bounded connects")
        assert len(hole.arrivals) >= 2  # every attempt went to TELEGRAM_DC
        assert "TIMEOUT" in w.log()
        first = wait_for(lambda: _health_ts(w), 5, "a health file")
        wait_for(lambda: _health_ts(w) not in (None, first), 10, "the heartbeat to move on")
        assert w.proc.poll() is None, w.log()
        assert rv.queue() == [raw.encode()]  # the command waits for a connected worker
    w.signal()
    assert w.wait(15) == 0, w.log()


def test_daemon_releases_a_command_as_retryable_when_the_server_stops_answering(
    fleet: Fleet, rv: RedisView
) -> None:
    # The simulator answers the authorisation check at connect, then nothing more.
    [w] = fleet.start(
        1,
        SIM_HANG_AFTER_REQUESTS=1,
        TELEGRAM_REQUEST_TIMEOUT_SECONDS=0.5,
        RETRY_MAX_ATTEMPTS=2,
        COMMAND_RETRY_MAX=1,
    )
    started = time.monotonic()
    rv.push(fetch("@ru_python", "2025-03-01", command_id="c-stuck"))
    failed = wait_for(
        lambda: [e for e in rv.events() if e["event"] == "failed"], 20, "a failed event"
    )
    assert failed[0]["retryable"] is True
    assert failed[0]["error"]["type"] == "TransientError"
    assert (
        "TIMEOUT" in failed[0]["error"]["message"] or "timed out" in failed[0]["error"]["message"]
    )
    assert time.monotonic() - started < 15
    first = _health_ts(w)
    wait_for(lambda: _health_ts(w) != first, 10, "the heartbeat to move on")
    assert w.proc.poll() is None, w.log()
