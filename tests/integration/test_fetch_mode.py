"""``FETCH_MODE`` (CONTRACT §6): the one-shot ``fetch`` without an interval fetches yesterday, or
the whole history with ``FETCH_MODE=full``; an interval on the command line always wins."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HISTORY_DAYS = 3  # the simulated chat's history starts this many days before today


def fetch(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """Run ``python -m worker fetch --chat @mode_chat …`` on the simulator; the days written."""
    data = tmp_path / "data"
    start = datetime.now(UTC).date() - timedelta(days=HISTORY_DAYS)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "fetch", "--chat", "@mode_chat", *args],
        cwd=tmp_path,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "TELEGRAM_BACKEND": "sim",
            "DATA_DIR": str(data),
            "SIM_HISTORY_START": start.isoformat(),
            "SIM_MESSAGES_PER_DAY": "20",
            "SIM_EMPTY_DAY_RATIO": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return sorted(p.stem.rsplit("_", 1)[-1] for p in data.rglob("discussions_*.json"))


def _days_before_today(*offsets: int) -> list[str]:
    today = datetime.now(UTC).date()
    return sorted(str(today - timedelta(days=n)) for n in offsets)


def test_without_an_interval_fetch_mode_yesterday_fetches_yesterday(tmp_path: Path) -> None:
    assert fetch(tmp_path, FETCH_MODE="yesterday") == _days_before_today(1)


def test_without_an_interval_fetch_mode_full_fetches_the_whole_history(tmp_path: Path) -> None:
    assert fetch(tmp_path, FETCH_MODE="full") == _days_before_today(3, 2, 1)


def test_an_interval_on_the_command_line_wins_over_fetch_mode_full(tmp_path: Path) -> None:
    day = _days_before_today(2)[0]
    assert fetch(tmp_path, "--date", day, FETCH_MODE="full") == [day]
