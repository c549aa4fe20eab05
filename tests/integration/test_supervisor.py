"""``supervisor.conf`` as shipped: real supervisord runs three workers and the governor, they serve
a command, and a stop ends every process cleanly (exit 0, no SIGKILL) within stopwaitsecs.

The file is copied into a temporary directory, which becomes its ``%(here)s``: the socket, pid
file and logs go there, never into the work tree, and ``%(here)s/.venv/bin/python`` is a
stand-in that runs this interpreter on this checkout (``PYTHONPATH``), so a clean clone needs no
``.venv`` and no editable install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from fleet.keys import Keys
from tests.integration.daemon_harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def install(here: Path) -> Path:
    """``supervisor.conf`` in ``here`` with the interpreter it names; returns the copy."""
    conf = here / "supervisor.conf"
    shutil.copy(ROOT / "supervisor.conf", conf)
    python = here / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # A script, not a symlink: a symlinked venv interpreter would not find its site-packages.
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return conf


def ctl(conf: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "supervisorctl"), "-c", str(conf), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_supervisor_conf_runs_the_fleet_and_stops_it_cleanly(
    redis_url: str, tmp_path: Path
) -> None:
    here = tmp_path / "fleet"
    here.mkdir()
    conf = install(here)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELEGRAM_", "SIM_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        REDIS_URL=redis_url,
        TELEGRAM_BACKEND="sim",
        SIM_SESSIONS="sup-1,sup-2,sup-3",
        SIM_HISTORY_REQUESTS="0",
        SIM_RESOLVE_REQUESTS="0",
        SIM_MESSAGES_PER_DAY="100",
        DATA_DIR=str(tmp_path / "data"),
        SESSIONS_DIR=str(tmp_path / "sessions"),
        METRICS_MODE="off",
        LOG_FORMAT="json",
        SHUTDOWN_GRACE_SECONDS="10",
    )
    log = here / "logs" / "supervisord.log"
    log.parent.mkdir()
    sup = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(conf)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # RUNNING once startsecs=5 passed without an exit (a config error would show as FATAL).
        def states() -> dict[str, str]:
            out = ctl(conf, "status", env=env).stdout
            return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if len(ln.split()) > 1}

        names = ("worker:worker_00", "worker:worker_01", "worker:worker_02", "governor")
        wait_for(
            lambda: all(states().get(n) == "RUNNING" for n in names), 60, "all processes RUNNING"
        )

        client = redis.Redis.from_url(redis_url)
        command = {
            "command": "fetch",
            "chat": "@supervised",
            "mode": "days",
            "days": 2,
            "command_id": "sup-1",
        }
        client.rpush(Keys().commands, json.dumps(command))
        wait_for(lambda: client.zscore(Keys().completed, "sup-1") is not None, 60, "completed")
        assert len(list((tmp_path / "data" / "supervised").rglob("discussions_*.json"))) == 2
        client.close()

        started = time.monotonic()
        stop = ctl(conf, "stop", "all", env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert time.monotonic() - started < 35  # within stopwaitsecs: nobody was SIGKILLed
    finally:
        ctl(conf, "shutdown", env=env)
        try:
            sup.wait(30)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait(10)
    lines = log.read_text(encoding="utf-8")
    for name in ("worker_00", "worker_01", "worker_02", "governor"):
        assert f"stopped: {name} (exit status 0)" in lines, lines[-3000:]
    assert "SIGKILL" not in lines
    assert sup.returncode == 0
