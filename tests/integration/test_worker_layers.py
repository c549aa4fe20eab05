"""A worker process loads the fleet core and the worker, never the governor (issue 9): checked
in a real worker on the simulator that ran one command, from its own ``sys.modules``."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.integration.daemon_harness import RedisView, base_env, fetch, wait_for

CHILD = Path(__file__).with_name("modules_child.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_worker_that_ran_a_command_loaded_no_governor_module(
    redis_url: str, tmp_path: Path
) -> None:
    dump = tmp_path / "modules.json"
    env = base_env(
        redis_url,
        tmp_path / "data",
        tmp_path,
        MODULES_DUMP=dump,
        HEALTH_FILE=tmp_path / "health",
        # Everything a production worker starts: metrics server and the shared rate control.
        METRICS_MODE="scrape",
        METRICS_PORT=_free_port(),
        RATE_LIMIT_STRATEGY="adaptive",
    )
    rv = RedisView(redis_url)
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), "run"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        rv.push(fetch("@layers_chat", "2025-05-01", "2025-05-02", command_id="layers-1"))
        wait_for(lambda: "layers-1" in rv.completed_ids(), 60, "the command to complete")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        rv.close()
    loaded = json.loads(dump.read_text())
    ours = sorted(m for m in loaded if m.split(".")[0] in ("fleet", "worker", "governor"))
    print(f"worker process loaded {len(ours)} project modules: {' '.join(ours)}")
    assert "worker.daemon" in ours and "fleet.redisconn" in ours  # it really ran the daemon
    assert [m for m in ours if m.split(".")[0] == "governor"] == []
