"""A one-shot fetch SIGKILLed at random instants always leaves valid files, and resuming ends with
exactly the files of an uninterrupted run (CONTRACT §5: a file is absent or complete)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "worker/schemas/day_file.schema.json").read_text())
ARGS = ["fetch", "--chat", "@kill_test", "--from", "2025-11-01", "--to", "2025-11-03"]
KILLS_PER_SEQUENCE = 4
MIN_INTERRUPTED = 20  # kills that really land in a running fetch
MAX_KILLS = 48
STARTUP_S = 0.4  # interpreter + imports, before the first request


def env_for(data: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data.parent),
        "PYTHONPATH": str(ROOT),  # this checkout, with or without an editable install
        "TELEGRAM_BACKEND": "sim",
        "DATA_DIR": str(data),
        "SIM_MESSAGES_PER_DAY": "12000",
        "SIM_HISTORY_START": "2025-10-25",
        "SIM_HISTORY_REQUESTS": "0",
        "SIM_RESOLVE_REQUESTS": "0",
        "FETCH_STRATEGY": "batch",
        "PROGRESS_CHECKPOINT_SECONDS": "0",
    }


def run_to_end(data: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *ARGS],
        cwd=data.parent,
        env=env_for(data),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def day_files(data: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(data.rglob("discussions_*.json"))}


def assert_valid(data: Path) -> None:
    for path in day_files(data).values():
        doc = json.loads(path.read_text())  # a half-written file would not parse
        jsonschema.validate(doc, SCHEMA)
        ids = [m["id"] for m in doc["messages"]]
        assert ids == sorted(set(ids)) and doc["message_count"] == len(ids)


def messages(data: Path) -> dict[str, Any]:
    return {name: json.loads(p.read_text())["messages"] for name, p in day_files(data).items()}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fetch_killed_at_random_instants_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    reference = tmp_path / "reference" / "data"
    reference.parent.mkdir()
    started = time.monotonic()
    run_to_end(reference)
    full_run_s = time.monotonic() - started
    expected = messages(reference)
    assert len(expected) == 3 and sum(len(v) for v in expected.values()) > 5000

    rng = random.Random(20251109)
    interrupted = kills = seq = 0
    while interrupted < MIN_INTERRUPTED:
        assert kills < MAX_KILLS, f"only {interrupted} of {kills} kills landed in a running fetch"
        seq += 1
        data = tmp_path / f"seq{seq}" / "data"
        data.parent.mkdir()
        for _ in range(KILLS_PER_SEQUENCE):
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", *ARGS],
                cwd=data.parent,
                env=env_for(data),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # Aim inside the fetch phase; every kill resumes work, so the window shrinks.
            time.sleep(rng.uniform(0.1, STARTUP_S + (full_run_s - STARTUP_S) * 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills += 1
            assert_valid(data)
            if proc.returncode != -signal.SIGKILL:
                break  # it finished before the kill: this data root is complete
            interrupted += 1
        run_to_end(data)
        assert_valid(data)
        assert messages(data) == expected
        assert not list(data.rglob("*.tmp")) and not list(data.rglob("*.partial.jsonl"))
