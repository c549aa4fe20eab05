"""Storage with real processes: concurrent progress writers, and SIGKILL at random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.integration.storage_child import CHAT_KEY, DAY
from worker.progress import ProgressStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

N_MESSAGES = 8000
TRIALS = 24


def child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.storage_child", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_day(data_dir: Path, version: int, *, force: bool = False) -> tuple[float, float]:
    """Run a child to the end; returns seconds from ``ready`` to ``finishing`` and to exit."""
    with child("day", str(data_dir), str(N_MESSAGES), str(version), *(["--force"] * force)) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n"
        ready = time.monotonic()
        assert proc.stdout.readline() in ("finishing\n", "")
        finishing = time.monotonic()
        out = proc.stdout.read()  # communicate() would miss what readline() already buffered
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert out.startswith("done "), out
    return finishing - ready, time.monotonic() - ready


def day_file(data_dir: Path) -> Path:
    return data_dir / CHAT_KEY / "2025" / f"discussions_{DAY.isoformat()}.json"


def messages_of(path: Path) -> bytes:
    """The ``messages`` bytes of a complete, valid day file (asserted)."""
    raw = path.read_bytes()
    doc = json.loads(raw)  # raises on a partial file
    ids = [m["id"] for m in doc["messages"]]
    assert ids == sorted(set(ids))
    assert doc["message_count"] == len(ids)
    assert doc["timezone"] == "UTC" and doc["schema_version"] == "1.0.0"
    return raw.split(b"\n", 1)[1]


def test_concurrent_processes_lose_no_progress_update(tmp_path: Path) -> None:
    workers, updates = 4, 200
    start_at = time.time() + 1.0  # all children past their imports before the first update
    procs = [
        child("progress", str(tmp_path), str(w), str(updates), str(start_at))
        for w in range(workers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    doc = json.loads((tmp_path / "progress.json").read_text())
    store = ProgressStore(tmp_path, schema_version="1.0.0", timezone="UTC")
    assert sorted(doc["chats"]) == [f"w{w}" for w in range(workers)]
    for w in range(workers):
        assert len(doc["chats"][f"w{w}"]) == updates
        for j in range(updates):
            entry = store.get(f"w{w}", date(2024, 1, 1) + timedelta(days=j))
            assert entry is not None
            assert (entry.complete, entry.last_processed_msg_id, entry.message_count) == (
                j % 2 == 0,
                j + 1,
                j,
            )
    assert not list(tmp_path.glob("progress.json.*")), "no temp or corrupt files left behind"


def test_sigkill_at_any_moment_leaves_no_partial_file_and_resume_matches(tmp_path: Path) -> None:
    # References: an uninterrupted v1 run, and a forced v2 run over it.
    ref = tmp_path / "ref"
    appending, total = run_day(ref, 1)
    v1 = messages_of(day_file(ref))
    old_state = tmp_path / "old-state"
    shutil.copytree(ref, old_state)
    appending2, total2 = run_day(ref, 2, force=True)
    v2 = messages_of(day_file(ref))
    assert v1 != v2
    appending, total = max(appending, appending2), max(total, total2)

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for trial in range(TRIALS):
        data = tmp_path / f"trial{trial}"
        over_old_file = trial % 2 == 1  # odd trials: a forced re-fetch over a complete v1 day
        aim_at_finish = trial % 4 >= 2  # half the kills aimed at the write of the day file
        if over_old_file:
            shutil.copytree(old_state, data)
        with child("day", str(data), str(N_MESSAGES), "2", *(["--force"] * over_old_file)) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            if aim_at_finish:
                assert proc.stdout.readline() == "finishing\n"
                time.sleep(rng.uniform(0.0, (total - appending) * 1.1))
            else:
                time.sleep(rng.uniform(0.0, total))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        killed = proc.returncode == -signal.SIGKILL

        where = f"trial {trial} (seed {seed}, over_old_file={over_old_file})"
        path = day_file(data)
        if not path.exists():
            assert not over_old_file, f"{where}: the old file disappeared"
            state = "absent"
        else:
            content = messages_of(path)
            assert content in (v1, v2) if over_old_file else content == v2, where
            state = "old" if content == v1 and over_old_file else "new"
        key = f"{'killed' if killed else 'exited'}:{state}"
        outcomes[key] = outcomes.get(key, 0) + 1

        run_day(data, 2, force=over_old_file)
        assert messages_of(path) == v2, where
        assert not path.with_name(f".discussions_{DAY.isoformat()}.partial.jsonl").exists()
        assert not path.with_name(f".{path.name}.tmp").exists()
        store = ProgressStore(data, schema_version="1.0.0", timezone="UTC")
        assert store.is_complete(CHAT_KEY, DAY), where

    killed_mid_run = sum(n for k, n in outcomes.items() if k.startswith("killed"))
    assert killed_mid_run >= TRIALS // 2, f"too few kills landed mid-run: {outcomes}"
    print(f"seed {seed}: {outcomes}")
