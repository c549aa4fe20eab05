"""The README's first command runs a whole local fleet and reports success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_fleet_completes_every_command_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELEGRAM_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "!!" not in proc.stdout
    assert "exit codes 0, 0, 0, 0" in proc.stdout
    files = sorted((tmp_path / "data").rglob("discussions_*.json"))
    assert len(files) == 11
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["message_count"] == len(doc["messages"])
    assert not (tmp_path / "data" / "etc").exists()
    # It shows the governor's work and leaves nothing behind but the day files and progress.
    assert "what the governor did" in proc.stdout and "each worker's share" in proc.stdout
    assert "rates settled on: fleet" in proc.stdout
    assert not list((tmp_path / "data").rglob("*.lock"))
    assert not (tmp_path / "data" / "private_club").exists()
    assert "worker dead-letters (" not in proc.stdout  # no hint that needs the demo's Redis


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_demo_works_on_a_fresh_clone_with_the_example_env(tmp_path: Path) -> None:
    """The README's first command, as written, from a fresh clone whose .env is .env.example.
    One deviation, for this machine only: the clone's .venv is this test's environment (and
    `make -o` keeps make from reinstalling into it), instead of a new one built by pip."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    (clone / ".venv").symlink_to(Path(sys.prefix))
    (clone / ".env").write_text((clone / ".env.example").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELEGRAM_"))}
    env["PYTHONPATH"] = str(clone)  # the editable install points at the main checkout
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exit codes 0, 0, 0, 0" in proc.stdout
    assert len(sorted((clone / "data").rglob("discussions_*.json"))) == 11
