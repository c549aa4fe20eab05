"""The README's first step, ``cp .env.example .env``, leaves every program able to start.

``.env.example`` ships keys with empty values (``METRICS_MODE=``, ``TELEGRAM_API_ID=``,
``TELEGRAM_SESSION=`` …); an empty value means "unset" wherever it comes from (.env, the
environment, Compose's ``${X:-}``, supervisord's ``%(ENV_X)s``), so the default applies instead
of a validation error and exit 78.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.settings import load_settings
from governor.settings import GovernorSettings
from tests.integration.daemon_harness import wait_for
from worker.settings import WorkerSettings
from worker.sim.settings import SimSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIG_ERROR = 78


def _copied_env(directory: Path) -> Path:
    shutil.copy(ROOT / ".env.example", directory / ".env")
    return directory / ".env"


def _proc_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The test runner's environment minus every setting, so only .env (and ``extra``) count."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "LOG_", "PUSHGATEWAY_")
        )
    }
    env.update(REDIS_URL=redis_url, **extra)
    return env


def test_env_example_copied_as_is_loads_every_settings_class(clean_env: Path) -> None:
    _copied_env(clean_env)
    for cls in (WorkerSettings, SimSettings, GovernorSettings):
        settings = load_settings(cls)
        assert settings.metrics_mode is None  # `METRICS_MODE=` -> the environment's default
        assert settings.effective_metrics_mode == "scrape"
    worker = load_settings(WorkerSettings)
    assert worker.telegram_api_id is None
    assert worker.telegram_session is None  # empty = claim a free session


def test_empty_environment_variables_mean_unset(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Compose passes for `${METRICS_PORT:-}` and supervisord for an empty %(ENV_X)s.
    for key in ("METRICS_MODE", "TELEGRAM_API_ID", "TELEGRAM_SESSION", "REDIS_PORT", "SIM_SEED"):
        monkeypatch.setenv(key, "")
    settings = load_settings(SimSettings)
    assert settings.metrics_mode is None and settings.telegram_api_id is None
    assert settings.redis_port == 6379


def _started(program: str, directory: Path, log: Path) -> bool:
    if program == "governor":
        return "leads now" in log.read_text(encoding="utf-8", errors="replace")
    try:
        health = json.loads((directory / "health").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(health, dict) and health.get("status") == "waiting_session"


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "run"],
        ["governor", "run"],
    ],
    ids=["worker", "governor"],
)
@pytest.mark.timeout(60)
def test_daemons_start_and_stop_cleanly_with_env_example(
    redis_url: str, tmp_path: Path, argv: list[str]
) -> None:
    _copied_env(tmp_path)
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=tmp_path,
            env=_proc_env(redis_url, HEALTH_FILE=str(tmp_path / "health")),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            # Started = past every check of the configuration (an error there exits 78): the
            # worker waits for a Telegram session (.env.example names none), the governor leads.
            wait_for(
                lambda: proc.poll() is not None or _started(argv[0], tmp_path, log),
                30,
                f"{argv[0]} started",
            )
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize(
    "argv",
    [["worker", "status"], ["governor", "status"], ["worker", "dead-letters"]],
    ids=["worker-status", "governor-status", "dead-letters"],
)
@pytest.mark.timeout(60)
def test_operator_commands_run_with_env_example(
    redis_url: str, tmp_path: Path, argv: list[str]
) -> None:
    _copied_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=tmp_path,
        env=_proc_env(redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != CONFIG_ERROR, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
