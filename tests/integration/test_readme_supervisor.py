"""README.md's "Running the fleet" sequence, run literally on a fresh clone with real supervisord.

The commands are read from the section's fenced ``bash`` block, so the README cannot drift from
what works. Two deviations, both for this machine and not for the user: ``make venv`` becomes a
link to the test's own virtualenv (no network installs in a test), and ``.env`` gets a free
``REDIS_PORT`` and ``METRICS_MODE=off`` so that parallel runs never collide on fixed ports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import wait_for
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]
STOPPED = ("FATAL", "EXITED")
WORKERS = ("worker:worker_00", "worker:worker_01", "worker:worker_02")
EVERYONE = (*WORKERS, "governor")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Running the fleet\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "README's 'Running the fleet' has no ```bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def _env(clone: Path) -> dict[str, str]:
    """No setting from the test runner: the clone's .env is the whole configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "LOG_", "PUSHGATEWAY_", "DATA_")
        )
        and k not in ("SESSIONS_DIR", "HEALTH_FILE", "ENVIRONMENT")
    }
    # The editable install points at the main checkout: make the clone's code the one imported.
    env["PYTHONPATH"] = str(clone)
    return env


def _run(line: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=180
    )


def _states(clone: Path, env: dict[str, str]) -> dict[str, str]:
    out = _run(".venv/bin/supervisorctl -c supervisor.conf status", clone, env).stdout
    return {p[0]: p[1] for p in (ln.split() for ln in out.splitlines()) if len(p) > 1}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours (supervisord was our grandchild, so never ours) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _all_pids(clone: Path, env: dict[str, str]) -> list[int]:
    out = _run(".venv/bin/supervisorctl -c supervisor.conf pid all", clone, env).stdout
    pids = [int(x) for x in out.split() if x.isdigit() and int(x) > 0]
    pids.append(int((clone / ".supervisord.pid").read_text()))
    return pids


def _shutdown_and_wait(clone: Path, env: dict[str, str]) -> list[int]:
    pids = _all_pids(clone, env)
    done = _run(".venv/bin/supervisorctl -c supervisor.conf shutdown", clone, env)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: not any(_alive(p) for p in pids), 60, "every supervised process gone")
    return pids


@pytest.mark.timeout(300)
def test_readme_running_the_fleet_works_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    assert not (clone / ".env").exists() and not (clone / ".redis").exists()
    env = _env(clone)
    lines = readme_commands()
    assert any("supervisord -c supervisor.conf" in ln for ln in lines)
    started = False
    try:
        for line in lines:
            if line.startswith("make venv"):
                (clone / ".venv").symlink_to(Path(sys.prefix))
                continue
            if "supervisord -c" in line:
                with open(clone / ".env", "a", encoding="utf-8") as fh:
                    fh.write(f"REDIS_PORT={free_port()}\nMETRICS_MODE=off\n")
            done = _run(line, clone, env)
            output = done.stdout + done.stderr
            if "supervisord -c" in line:
                assert done.returncode == 0, output
                started = True
                wait_for(
                    lambda: all(_states(clone, env).get(n) == "RUNNING" for n in EVERYONE),
                    60,
                    "workers and governor RUNNING",
                )
                assert _states(clone, env)["redis"] == "RUNNING"  # REDIS_URL is empty: local
            elif "supervisorctl" in line and " status" in line:
                # Exit 3 = some program is not RUNNING: the spare worker slots are STOPPED.
                assert done.returncode in (0, 3), output
                assert "worker:worker_00" in output and "governor" in output, output
            elif "worker status" in line:
                assert done.returncode == 0, output
                assert "queue tg_commands" in output, output
            elif "worker send" in line or "worker listen" in line:
                assert done.returncode == 0, output
                assert "completed" in output and "@ru_python" in output, output
            elif "scale.sh" in line:
                n = int(line.split("scale.sh", 1)[1].split()[0])
                want = {f"worker:worker_0{i}" for i in range(min(n, 3))}
                states = _states(clone, env)
                running = {k for k, v in states.items() if "worker_" in k and v == "RUNNING"}
                assert running == want, states
            elif "shutdown" in line:
                assert done.returncode == 0, output
                started = False
                pid = int((clone / ".supervisord.pid").read_text())
                wait_for(lambda pid=pid: not _alive(pid), 60, "supervisord gone")
            else:
                assert done.returncode == 0, f"{line}: {output}"
        assert not started, "the README's sequence must end by stopping the fleet"
        files = sorted((clone / "data" / "ru_python").rglob("discussions_*.json"))
        assert len(files) == 3, files
        assert not list(clone.glob(".supervisor*.sock"))
    finally:
        if started:
            _shutdown_and_wait(clone, env)

    # A configuration error stops the worker for good: one spawn each, no restarts. It is FATAL
    # when the exit comes before startsecs (startretries=0), EXITED (78 is an expected exit
    # code) when a loaded machine makes the start slower than that.
    with open(clone / ".env", "a", encoding="utf-8") as fh:
        fh.write("PARALLELISM_MAX=0\n")
    log = clone / "logs" / "supervisord.log"
    before = log.read_text().count("spawned: 'worker_00'")
    assert _run(".venv/bin/supervisord -c supervisor.conf", clone, env).returncode == 0
    try:
        try:
            wait_for(
                lambda: all(_states(clone, env).get(n) in STOPPED for n in WORKERS), 60, "stopped"
            )
        except AssertionError as exc:
            tail = log.read_text()[-2000:]
            raise AssertionError(f"{exc}: {_states(clone, env)}\n{tail}") from None
        time.sleep(4)  # longer than startsecs: a restart would have shown by now
        assert all(_states(clone, env).get(n) in STOPPED for n in WORKERS)
        assert log.read_text().count("spawned: 'worker_00'") == before + 1
        assert "PARALLELISM_MAX" in (clone / "logs" / "worker_00.log").read_text()
        assert _states(clone, env)["governor"] == "RUNNING"  # a worker-only key
    finally:
        pids = _shutdown_and_wait(clone, env)
    assert not any(_alive(p) for p in pids)
