"""progress.json: entries, time-zone trust, corrupt files, locking between writers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
from loguru import logger

from fleet.clock import FakeClock
from worker.diskio import file_lock
from worker.errors import StorageError
from worker.progress import DayProgress, ProgressStore

SCHEMA = json.loads(
    (
        Path(__file__).resolve().parents[2] / "worker" / "schemas" / "progress.schema.json"
    ).read_text()
)
DAY = date(2025, 11, 7)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 11, 8, 1, 0, 3, tzinfo=UTC))


@pytest.fixture
def progress(tmp_path: Path, clock: FakeClock) -> ProgressStore:
    return ProgressStore(
        tmp_path / "data", schema_version="1.0.0", timezone="UTC", clock=clock, lock_timeout_s=0.05
    )


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    handler = logger.add(lambda m: seen.append(str(m)), level="WARNING", format="{message}")
    try:
        yield seen
    finally:
        logger.remove(handler)


def validate(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def test_missing_file_reads_as_empty(progress: ProgressStore) -> None:
    assert progress.get("chat", DAY) is None
    assert not progress.is_complete("chat", DAY)
    assert progress.snapshot() == {"schema_version": "1.0.0", "timezone": "UTC", "chats": {}}


def test_update_round_trips_and_matches_the_schema(progress: ProgressStore) -> None:
    entry = progress.update(
        "ru_python", DAY, complete=True, last_processed_msg_id=123, message_count=2
    )
    assert entry == DayProgress(True, 123, 2, "UTC", "2025-11-08T01:00:03Z")
    assert progress.get("ru_python", DAY) == entry
    assert progress.is_complete("ru_python", DAY)
    doc = validate(progress.path)
    assert doc == {
        "schema_version": "1.0.0",
        "timezone": "UTC",
        "chats": {"ru_python": {"2025-11-07": entry.to_json()}},
    }


def test_updates_keep_other_entries(progress: ProgressStore) -> None:
    progress.update("a", DAY, complete=True, last_processed_msg_id=1, message_count=1)
    progress.update("b", DAY, complete=False, last_processed_msg_id=5, message_count=None)
    progress.update(
        "a", DAY + timedelta(days=1), complete=False, last_processed_msg_id=0, message_count=None
    )
    progress.update("b", DAY, complete=True, last_processed_msg_id=9, message_count=4)
    chats = validate(progress.path)["chats"]
    assert isinstance(chats, dict)
    assert sorted((k, d) for k, days in chats.items() for d in days) == [
        ("a", "2025-11-07"),
        ("a", "2025-11-08"),
        ("b", "2025-11-07"),
    ]
    assert progress.get("b", DAY) == DayProgress(True, 9, 4, "UTC", "2025-11-08T01:00:03Z")


def test_entry_from_another_timezone_is_not_trusted(tmp_path: Path, clock: FakeClock) -> None:
    berlin = ProgressStore(tmp_path, schema_version="1.0.0", timezone="Europe/Berlin", clock=clock)
    berlin.update("chat", DAY, complete=True, last_processed_msg_id=3, message_count=3)
    utc = ProgressStore(tmp_path, schema_version="1.0.0", timezone="UTC", clock=clock)
    assert utc.get("chat", DAY) is not None
    assert not utc.is_complete("chat", DAY)
    assert berlin.is_complete("chat", DAY)


@pytest.mark.parametrize(
    "content",
    [b'{"schema_version":"1.0.0","chats":{"a":', b"\x00\x00\x00", b"[]", b'{"chats":[]}', b"\xff"],
    ids=["truncated", "zeros", "list", "chats-not-object", "not-utf8"],
)
def test_corrupt_file_is_set_aside_and_treated_as_empty(
    progress: ProgressStore, content: bytes, warnings: list[str]
) -> None:
    progress.data_dir.mkdir(parents=True)
    progress.path.write_bytes(content)

    assert progress.get("chat", DAY) is None

    aside = progress.data_dir / "progress.json.corrupt-20251108T010003Z"
    assert aside.read_bytes() == content
    assert not progress.path.exists()
    assert any("progress.json is corrupt" in w for w in warnings)
    progress.update("chat", DAY, complete=True, last_processed_msg_id=1, message_count=1)
    assert progress.is_complete("chat", DAY)


def test_corrupt_file_found_by_an_update_is_set_aside_too(progress: ProgressStore) -> None:
    progress.data_dir.mkdir(parents=True)
    progress.path.write_bytes(b"{not json")
    (progress.data_dir / "progress.json.corrupt-20251108T010003Z").write_text("earlier")
    progress.update("chat", DAY, complete=False, last_processed_msg_id=1, message_count=None)
    assert (progress.data_dir / "progress.json.corrupt-20251108T010003Z-1").read_bytes() == (
        b"{not json"
    )
    validate(progress.path)


def test_malformed_entry_counts_as_absent(progress: ProgressStore) -> None:
    progress.data_dir.mkdir(parents=True)
    progress.path.write_text(
        json.dumps(
            {
                "schema_version": "1.0.0",
                "timezone": "UTC",
                "chats": {"a": {"2025-11-07": {"complete": "yes"}}, "b": "nonsense"},
            }
        )
    )
    assert progress.get("a", DAY) is None
    assert progress.get("b", DAY) is None
    progress.update("b", DAY, complete=True, last_processed_msg_id=1, message_count=1)
    assert progress.is_complete("b", DAY)


def test_invalid_chat_key_is_refused(progress: ProgressStore) -> None:
    with pytest.raises(StorageError):
        progress.update("../x", DAY, complete=True, last_processed_msg_id=1, message_count=1)


def test_update_waits_for_the_chat_s_lock_then_gives_up_retryably(
    progress: ProgressStore,
) -> None:
    (progress.data_dir / "chat").mkdir(parents=True)
    with (
        file_lock(progress.chat_lock_path("chat"), 1.0, "test"),
        pytest.raises(StorageError, match="locked by another writer") as raised,
    ):
        progress.update("chat", DAY, complete=True, last_processed_msg_id=1, message_count=1)
    assert raised.value.retryable  # a lock held too long is the environment: retry later


def test_a_stalled_holder_of_the_progress_json_lock_stalls_no_update(
    progress: ProgressStore,
) -> None:
    progress.data_dir.mkdir(parents=True)
    progress.update("chat", DAY, complete=False, last_processed_msg_id=1, message_count=None)
    with file_lock(progress.lock_path, 1.0, "test"):  # held "forever" by a paused process
        started = time.monotonic()
        progress.update("chat", DAY, complete=True, last_processed_msg_id=5, message_count=5)
        progress.update("other", DAY, complete=True, last_processed_msg_id=2, message_count=2)
        assert time.monotonic() - started < 3  # two skipped copies, not two lock timeouts
        assert progress.is_complete("chat", DAY) and progress.is_complete("other", DAY)
        assert not validate(progress.path)["chats"]["chat"]["2025-11-07"]["complete"]
    progress.update("other", DAY, complete=True, last_processed_msg_id=3, message_count=3)
    chats = validate(progress.path)["chats"]  # the next update rebuilt the whole copy
    assert chats["chat"]["2025-11-07"]["complete"] and chats["other"]["2025-11-07"]["complete"]


def test_unwritable_data_dir_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    store = ProgressStore(tmp_path / "data", schema_version="1.0.0", timezone="UTC")
    with pytest.raises(StorageError, match="cannot create"):
        store.update("chat", DAY, complete=True, last_processed_msg_id=1, message_count=1)


def test_threads_updating_at_once_lose_nothing(progress: ProgressStore) -> None:
    errors: list[BaseException] = []
    slow = ProgressStore(
        progress.data_dir, schema_version="1.0.0", timezone="UTC", lock_timeout_s=10.0
    )

    def work(n: int) -> None:
        try:
            for j in range(25):
                slow.update(
                    f"t{n}",
                    DAY + timedelta(days=j),
                    complete=True,
                    last_processed_msg_id=j,
                    message_count=j,
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    chats = validate(progress.path)["chats"]
    assert isinstance(chats, dict)
    assert sum(len(days) for days in chats.values()) == 6 * 25
