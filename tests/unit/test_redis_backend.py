"""TEST_REDIS selects the integration suite's Redis; without an engine it falls back to a
process and says so in one line (the pytest report header)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _describe(**env: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",  # importing testcontainers must not warn (filterwarnings = error)
            "-c",
            "from tests.redis_server import backend_description as d, new_redis_server as n\n"
            "from pathlib import Path\n"
            "print(d()); print(type(n(Path('unused'))).__name__)",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_default_backend_is_a_local_process() -> None:
    out = _describe(TEST_REDIS="")
    assert "local redis-server process" in out and "RedisServer" in out


def test_docker_backend_without_an_engine_falls_back_and_says_why() -> None:
    out = _describe(TEST_REDIS="docker", DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert "TEST_REDIS=docker, but" in out and "RedisServer" in out
    assert len(out.splitlines()) == 2
