"""Storage with real processes: concurrent progress writers, and SIGKILL at every durable step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.integration.storage_child import CHAT_KEY, DAY
from worker.progress import ProgressStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

N_MESSAGES = 8000


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


def run_day(
    data_dir: Path, version: int, *, force: bool = False, trace: Path | None = None
) -> tuple[float, float]:
    """Run a child to the end; returns seconds from ``ready`` to ``finishing`` and to exit."""
    extra = ["--force"] * force + (["--trace", str(trace)] if trace is not None else [])
    with child("day", str(data_dir), str(N_MESSAGES), str(version), *extra) as proc:
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


def kill_points(trace: list[str], *, thorough: bool) -> list[tuple[str, int]]:
    """Where to kill (``("stop", K)``: before step K; ``("tear", K)``: halfway through the
    journal write K): every step of the first and last page and of the finish, and a torn
    journal line in the first, middle and last page (``thorough=False``: the first page, the
    finish and the middle tear)."""
    pages = [k for k, step in enumerate(trace, 1) if step.startswith("page write:")]
    finish = [k for k, step in enumerate(trace, 1) if step.startswith("finish ")]
    first_page = list(range(pages[0], pages[1]))
    last_page = list(range(pages[-1], finish[0]))
    stops = first_page + (last_page if thorough else []) + finish
    tears = [pages[0], pages[len(pages) // 2], pages[-1]] if thorough else [pages[len(pages) // 2]]
    return [("stop", k) for k in stops] + [("tear", k) for k in tears]


def test_sigkill_at_every_durable_step_leaves_no_partial_file_and_resume_matches(
    tmp_path: Path,
) -> None:
    # References: an uninterrupted v1 run, and a forced v2 run over it, each with the list of
    # durable steps it took (journal writes, fsyncs, renames, unlinks).
    ref = tmp_path / "ref"
    run_day(ref, 1, trace=tmp_path / "fresh.trace")
    v1 = messages_of(day_file(ref))
    old_state = tmp_path / "old-state"
    shutil.copytree(ref, old_state)
    run_day(ref, 2, force=True, trace=tmp_path / "over.trace")
    v2 = messages_of(day_file(ref))
    assert v1 != v2

    trials = []
    for over_old_file in (False, True):  # a first fetch, and a forced re-fetch over a v1 day
        trace = (tmp_path / ("over.trace" if over_old_file else "fresh.trace")).read_text()
        steps = trace.splitlines()
        renamed_at = steps.index(f"finish replace:{day_file(ref).relative_to(ref)}") + 1
        for how, k in kill_points(steps, thorough=not over_old_file):
            data = tmp_path / f"trial{len(trials) + 1}"
            trials.append((data, how, k, steps, renamed_at, over_old_file))

    def trial(
        data: Path, how: str, k: int, steps: list[str], renamed_at: int, over_old_file: bool
    ) -> str:
        """One kill at a chosen step, then a resume; the day file's state after the kill."""
        if over_old_file:
            shutil.copytree(old_state, data)
        force = ["--force"] * over_old_file
        proc = child("day", str(data), str(N_MESSAGES), "2", *force, f"--{how}-at", str(k))
        try:  # the child waits at the kill point: it must never outlive a failed assertion
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            line = proc.stdout.readline()
            if line == "finishing\n":
                line = proc.stdout.readline()
            assert line == f"stopped {k} {steps[k - 1]}\n", (line, how, k)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        where = f"{how} at step {k} ({steps[k - 1]}), over_old_file={over_old_file}"
        path = day_file(data)
        if not path.exists():
            assert not over_old_file, f"{where}: the old file disappeared"
            state = "absent"
        else:
            content = messages_of(path)
            state = "new" if content == v2 else "old" if content == v1 else "other"
        # The day file changes in one rename: before it the old state, after it the new one.
        expected = "new" if k > renamed_at else "old" if over_old_file else "absent"
        assert state == expected, where

        run_day(data, 2, force=over_old_file)
        assert messages_of(path) == v2, where
        assert not path.with_name(f".discussions_{DAY.isoformat()}.partial.jsonl").exists()
        assert not path.with_name(f".{path.name}.tmp").exists()
        store = ProgressStore(data, schema_version="1.0.0", timezone="UTC")
        assert store.is_complete(CHAT_KEY, DAY), where
        return state

    # Each trial has its own directory and child processes, and its kill point is a step, not
    # a moment: two at a time (one per core) changes nothing but the wall time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(trial, *t) for t in trials]
        try:
            outcomes = Counter(f.result() for f in futures)
        finally:
            for f in futures:  # after a failure, start no further trial
                f.cancel()
    print(f"{len(trials)} kills, each at a chosen step; day file after the kill: {dict(outcomes)}")
