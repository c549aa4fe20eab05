"""Storage faults are the environment's, not the command's: a full disk, a read-only DATA_DIR,
a failing disk or a lock held too long are retried with backoff, end in the dead letters (for
a requeue) when the budget is spent, and a worker whose own storage keeps failing stops taking
commands and reports unhealthy, so the others do the work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for
from worker.errors import StorageError
from worker.storage import DayStore

DAY = date(2025, 11, 7)


def _msg(i: int) -> dict[str, Any]:
    return {"id": i, "date": "2025-11-07T10:00:00Z", "text": "hi"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_an_environment_error_below_the_storage_layer_is_a_retryable_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    store = DayStore(tmp_path / "data", schema_version="1.0.0", timezone="UTC")
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:
        raise OSError(code, os.strerror(code))

    with store.open_day("chat", "@chat", DAY) as writer:
        monkeypatch.setattr("worker.storage.os.write", failing_write)
        with pytest.raises(StorageError) as raised:
            writer.append_page([_msg(1), _msg(2)])
        assert raised.value.retryable
        monkeypatch.setattr("worker.storage.os.write", real_write)
        assert writer.append_page([_msg(1), _msg(2)]) == 2  # the next try works: nothing lost
        writer.finish()
    assert store.is_complete("chat", DAY)


def test_a_bad_message_is_still_a_permanent_error(tmp_path: Path) -> None:
    store = DayStore(tmp_path / "data", schema_version="1.0.0", timezone="UTC")
    with store.open_day("chat", "@chat", DAY) as writer, pytest.raises(Exception) as raised:
        writer.append_page([{"id": "not an id"}])
    assert not getattr(raised.value, "retryable", False)


# --- real file systems: a tmpfs mounted read-only, a tmpfs that is full -----------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(
        redis_url, data_dir, tmp_path, COMMAND_RETRY_BASE_SECONDS=0.2, COMMAND_RETRY_MAX=5
    )


def _terminal(rv: RedisView) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in rv.events():
        if e["event"] in ("completed", "failed"):
            out.setdefault(e["command_id"], []).append(e["event"])
    return out


@pytest.mark.slow
def test_a_worker_with_a_read_only_data_dir_fails_nothing_and_stops_taking_commands(
    fleet: Fleet, rv: RedisView, tmpfs: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    [ro] = fleet.start(1, DATA_DIR=tmpfs / "data")
    ids = [f"c{i}" for i in range(6)]
    rv.push(*(fetch("@ru_python", f"2025-03-{i + 1:02d}", command_id=c) for i, c in enumerate(ids)))
    wait_for(lambda: (ro.health_data() or {}).get("status") == "storage_error", 30, "unhealthy")
    fleet.start(1)  # a healthy worker on a writable DATA_DIR
    wait_for(
        lambda: sum("completed" in kinds for kinds in _terminal(rv).values()) == 6,
        60,
        "6 commands completed",
    )
    ends = _terminal(rv)
    # Each execution on the read-only worker ended in a retryable failure; one completed each.
    assert all(
        kinds.count("completed") == 1 and kinds[-1] == "completed" for kinds in ends.values()
    )
    assert all(e["retryable"] for e in rv.by_kind("failed"))
    assert not rv.dead_letters()
    assert ro.proc.poll() is None and ro.health_data()["status"] == "storage_error"
    check = subprocess.run(
        [sys.executable, "-m", "worker", "check"],
        env={**fleet.env, "HEALTH_FILE": str(ro.health)},
        capture_output=True,
    )
    assert check.returncode == 1, check


@pytest.mark.slow
def test_a_full_disk_ends_in_the_dead_letters_and_a_requeue_completes_the_command(
    fleet: Fleet, rv: RedisView, tmpfs: Path
) -> None:
    filler = tmpfs / "filler"
    with open(filler, "wb") as fh:  # fill the file system up
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    fleet.start(1, DATA_DIR=tmpfs / "data", COMMAND_RETRY_MAX=1)
    rv.push(fetch("@ru_python", "2025-03-01", command_id="full"))
    [letter] = wait_for(rv.dead_letters, 30, "the dead letter")
    kinds = [(e["event"], e.get("retryable")) for e in rv.by_kind("failed")]
    assert kinds == [("failed", True), ("failed", False)], kinds
    assert letter["command_id"] == "full" and "No space left" in letter["reason"]

    filler.unlink()  # space is back; the operator requeues
    requeue = subprocess.run(
        [sys.executable, "-m", "worker", "dead-letters", "--requeue", letter["id"]],
        env=fleet.env,
        capture_output=True,
    )
    assert requeue.returncode == 0, requeue
    wait_for(lambda: "completed" in _terminal(rv).get("full", []), 30, "completed after requeue")
    assert _terminal(rv)["full"] == ["failed", "failed", "completed"]
    assert not rv.dead_letters()
    day = json.loads((tmpfs / "data/ru_python/2025/discussions_2025-03-01.json").read_text())
    assert day["message_count"] == len(day["messages"]) > 0


# --- a paused process holding a lock -----------------------------------------------------------

HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.fixture
def paused_holder() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def hold(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        wait_for(lambda: _stopped(proc.pid), 5, "holder stopped")

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[-1].split()[0] == "T"


def test_a_paused_holder_of_the_progress_json_lock_stalls_no_writer(
    tmp_path: Path, paused_holder: Any
) -> None:
    store = DayStore(tmp_path / "data", schema_version="1.0.0", timezone="UTC", lock_timeout_s=30)
    paused_holder(store.progress.lock_path)
    with store.open_day("chat", "@chat", DAY) as writer:
        writer.append_page([_msg(1), _msg(2)])
        writer.finish()
    assert store.is_complete("chat", DAY)  # well within the 30 s lock timeout


def test_a_paused_holder_of_a_day_lock_is_a_retryable_error_after_the_timeout(
    tmp_path: Path, paused_holder: Any
) -> None:
    store = DayStore(tmp_path / "data", schema_version="1.0.0", timezone="UTC", lock_timeout_s=0.5)
    path = store.day_path("chat", DAY)
    paused_holder(path.with_name(f".discussions_{DAY.isoformat()}.lock"))
    with pytest.raises(StorageError, match="locked by another writer") as raised:
        store.open_day("chat", "@chat", DAY)
    assert raised.value.retryable
    paused_holder(store.progress.chat_lock_path("other"))
    with pytest.raises(StorageError) as raised:
        store.progress.update("other", DAY, complete=True, last_processed_msg_id=1, message_count=1)
    assert raised.value.retryable
