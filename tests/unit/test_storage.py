"""Day files: layout, contract shape, merge, dedup, resume from the journal, path safety."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.clock import FakeClock
from worker.dayfile import iter_day_messages, validate_chat_key
from worker.daywriter import DayWriter
from worker.errors import StorageError
from worker.progress import DayProgress
from worker.storage import DayStore

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "worker" / "schemas"
DAY = date(2025, 11, 7)
KEY = "ru_python"
CHAT = "@ru_python"
HEADER_KEYS = [
    "schema_version",
    "timezone",
    "chat",
    "date",
    "message_count",
    "fetched_at",
    "messages",
]

StoreFactory = Callable[..., DayStore]


@cache
def _day_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / "day_file.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def assert_valid_day_file(path: Path) -> dict[str, Any]:
    """Schema-valid, keys in contract order, count right, ids sorted and unique."""
    doc = json.loads(path.read_bytes())
    _day_validator().validate(doc)
    assert list(doc) == HEADER_KEYS
    ids = [m["id"] for m in doc["messages"]]
    assert ids == sorted(set(ids))
    assert doc["message_count"] == len(ids)
    return doc


def messages_bytes(path: Path) -> bytes:
    """The raw bytes of the ``messages`` array (everything after the header line)."""
    return path.read_bytes().split(b"\n", 1)[1]


def msg(msg_id: int, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"id": msg_id, "date": "2025-11-07T10:00:00Z", "chat": CHAT, "text": text, **extra}


def pages(ids: Iterable[int], size: int = 3, text: str = "hi") -> list[list[dict[str, Any]]]:
    ids = list(ids)
    return [[msg(i, text) for i in ids[k : k + size]] for k in range(0, len(ids), size)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 11, 8, 1, 0, 3, tzinfo=UTC))


@pytest.fixture
def make_store(tmp_path: Path, clock: FakeClock) -> StoreFactory:
    def factory(**overrides: Any) -> DayStore:
        kwargs: dict[str, Any] = {
            "schema_version": "1.0.0",
            "timezone": "UTC",
            "clock": clock,
            "lock_timeout_s": 0.05,
            "checkpoint_interval_s": 0.0,
        }
        kwargs.update(overrides)
        return DayStore(tmp_path / "data", **kwargs)

    return factory


@pytest.fixture
def store(make_store: StoreFactory) -> DayStore:
    return make_store()


def write_day(
    store: DayStore, batches: list[list[dict[str, Any]]], *, force: bool = False, day: date = DAY
) -> Path:
    with store.open_day(KEY, CHAT, day, force=force) as writer:
        for page in batches:
            writer.append_page(page)
        return writer.finish()


def crash(writer: DayWriter) -> None:
    """Drop the writer the way a SIGKILL would: no checkpoint, no cleanup, just fds closed."""
    if writer._fd is not None:
        os.close(writer._fd)
        writer._fd = None
    assert writer._lock_fd is not None
    os.close(writer._lock_fd)
    writer._lock_fd = None


# --- shape and round trip -----------------------------------------------------------------------


def test_day_file_round_trips_in_contract_shape(store: DayStore, tmp_path: Path) -> None:
    path = write_day(store, pages([1, 2, 3, 4, 5]))

    assert path == tmp_path / "data" / KEY / "2025" / "discussions_2025-11-07.json"
    doc = assert_valid_day_file(path)
    assert doc["schema_version"] == "1.0.0"
    assert doc["timezone"] == "UTC"
    assert doc["chat"] == CHAT
    assert doc["date"] == "2025-11-07"
    assert doc["fetched_at"] == "2025-11-08T01:00:03Z"
    assert doc["messages"] == [msg(i) for i in range(1, 6)]
    assert list(iter_day_messages(path)) == doc["messages"]
    assert store.is_complete(KEY, DAY)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".discussions_2025-11-07.lock",
        "discussions_2025-11-07.json",
    ]


def test_id_is_written_first_and_output_is_deterministic(store: DayStore) -> None:
    path = write_day(store, [[{"text": "x", "date": "d", "id": 7, "views": 1}]])
    assert messages_bytes(path) == b'{"id":7,"text":"x","date":"d","views":1}\n]}\n'


def test_progress_records_the_completed_day(store: DayStore, clock: FakeClock) -> None:
    write_day(store, pages([3, 9, 12]))
    assert store.progress.get(KEY, DAY) == DayProgress(
        complete=True,
        last_processed_msg_id=12,
        message_count=3,
        timezone="UTC",
        updated_at="2025-11-08T01:00:03Z",
    )


def test_empty_day_still_gets_a_file(store: DayStore) -> None:
    path = write_day(store, [])
    doc = assert_valid_day_file(path)
    assert doc["message_count"] == 0
    assert doc["messages"] == []
    assert store.is_complete(KEY, DAY)
    assert store.progress.get(KEY, DAY) == DayProgress(True, 0, 0, "UTC", "2025-11-08T01:00:03Z")


def test_unicode_and_special_characters_survive(store: DayStore) -> None:
    texts = ["Привет 👋", "line\nbreak", "\u2028sep\u2029", 'quote " and \\', "\ud800 lone"]
    path = write_day(store, [[msg(i + 1, t) for i, t in enumerate(texts)]])
    doc = assert_valid_day_file(path)
    assert [m["text"] for m in doc["messages"]] == texts
    path.read_bytes().decode("utf-8")  # still valid UTF-8 despite the lone surrogate


def test_datetimes_in_messages_are_written_as_utc_strings(store: DayStore) -> None:
    moment = datetime(2025, 11, 7, 13, 20, tzinfo=UTC) + timedelta(hours=0)
    path = write_day(store, [[{"id": 1, "date": moment}]])
    assert assert_valid_day_file(path)["messages"][0]["date"] == "2025-11-07T13:20:00Z"


# --- ordering and dedup -------------------------------------------------------------------------


def test_resent_ids_are_dropped(store: DayStore) -> None:
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.append_page([msg(1), msg(2), msg(3)]) == 3
        assert writer.append_page([msg(2, "changed"), msg(3), msg(4)]) == 1
        assert writer.append_page([msg(1), msg(4)]) == 0
        path = writer.finish()
    doc = assert_valid_day_file(path)
    assert [(m["id"], m["text"]) for m in doc["messages"]] == [(i, "hi") for i in (1, 2, 3, 4)]


def test_a_page_out_of_order_is_sorted_and_its_duplicates_collapse(store: DayStore) -> None:
    path = write_day(store, [[msg(5), msg(2, "first"), msg(9), msg(2, "second")]])
    doc = assert_valid_day_file(path)
    assert [(m["id"], m["text"]) for m in doc["messages"]] == [(2, "second"), (5, "hi"), (9, "hi")]


@pytest.mark.parametrize(
    "bad",
    [
        {"date": "d"},
        {"id": True, "date": "d"},
        {"id": 0, "date": "d"},
        {"id": "1", "date": "d"},
        {"id": 1},
    ],
)
def test_malformed_messages_are_refused(store: DayStore, bad: dict[str, Any]) -> None:
    with store.open_day(KEY, CHAT, DAY) as writer, pytest.raises(ValueError):
        writer.append_page([bad])


# --- re-runs, force and merge -------------------------------------------------------------------


def test_complete_day_is_not_fetched_again(store: DayStore) -> None:
    path = write_day(store, pages([1, 2]))
    before = path.read_bytes()
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.complete
        with pytest.raises(RuntimeError):
            writer.append_page([msg(3)])
        assert writer.finish() == path
    assert path.read_bytes() == before


def test_a_complete_days_leftover_journal_is_swept_when_the_day_is_skipped(
    store: DayStore,
) -> None:
    """A kill between marking a day complete and deleting its journal left the journal
    forever: the fetcher skips complete days without opening them (seen in a CI run)."""
    path = write_day(store, pages([1, 2]))
    journal = path.with_name(f".discussions_{DAY.isoformat()}.partial.jsonl")
    journal.write_text('{"header": true}\n')  # what the kill left
    assert store.is_complete(KEY, DAY)
    before = path.read_bytes()
    assert store.sweep_journal(KEY, CHAT, DAY)
    assert not journal.exists()
    assert path.read_bytes() == before and store.is_complete(KEY, DAY)
    assert not store.sweep_journal(KEY, CHAT, DAY)


def test_force_refetch_rewrites_identical_messages_and_only_fetched_at_changes(
    store: DayStore, clock: FakeClock
) -> None:
    path = write_day(store, pages(range(1, 20)))
    first = path.read_bytes()
    clock.advance(3600)

    with store.open_day(KEY, CHAT, DAY, force=True) as writer:
        assert not writer.complete
        assert writer.resume_after_id == 0
        for page in pages(range(1, 20)):
            writer.append_page(page)
        writer.finish()

    second = path.read_bytes()
    assert messages_bytes(path) == first.split(b"\n", 1)[1]
    old_doc, new_doc = json.loads(first), json.loads(second)
    assert new_doc["fetched_at"] == "2025-11-08T02:00:03Z"
    assert {k: v for k, v in old_doc.items() if k != "fetched_at"} == {
        k: v for k, v in new_doc.items() if k != "fetched_at"
    }


def test_force_merges_with_the_existing_file_and_fresh_messages_win(store: DayStore) -> None:
    write_day(store, pages(range(1, 11)))
    refetched = [msg(i, "edited" if i == 7 else "hi") for i in range(5, 16)]
    path = write_day(store, [refetched[:4], refetched[4:]], force=True)

    doc = assert_valid_day_file(path)
    assert [m["id"] for m in doc["messages"]] == list(range(1, 16))
    assert {m["id"]: m["text"] for m in doc["messages"]}[7] == "edited"
    assert store.progress.get(KEY, DAY) == DayProgress(True, 15, 15, "UTC", "2025-11-08T01:00:03Z")


def test_force_with_nothing_fetched_keeps_the_old_messages(store: DayStore) -> None:
    path = write_day(store, pages([1, 2, 3]))
    before = messages_bytes(path)
    write_day(store, [], force=True)
    assert messages_bytes(path) == before


def test_missing_progress_refetches_and_merges_to_the_same_bytes(store: DayStore) -> None:
    path = write_day(store, pages(range(1, 30)))
    before = messages_bytes(path)
    store.progress.path.unlink()
    store.progress.chat_path(KEY).unlink()  # the chat's record is the truth; both are lost
    assert not store.is_complete(KEY, DAY)
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert not writer.complete and writer.resume_after_id == 0
    write_day(store, pages(range(1, 30)))
    assert messages_bytes(path) == before


def test_foreign_layout_file_is_merged_in_memory(store: DayStore) -> None:
    path = store.day_path(KEY, DAY)
    path.parent.mkdir(parents=True)
    foreign = {
        "schema_version": "1.0.0",
        "timezone": "UTC",
        "chat": CHAT,
        "date": "2025-11-07",
        "message_count": 3,
        "fetched_at": "2025-11-08T00:00:00Z",
        "messages": [msg(9, "nine"), msg(1, "one"), msg(4, "four")],
    }
    path.write_text(json.dumps(foreign, indent=2))
    assert [m["id"] for m in iter_day_messages(path)] == [9, 1, 4]

    write_day(store, [[msg(4, "FOUR"), msg(5)]], force=True)

    doc = assert_valid_day_file(path)
    assert [(m["id"], m["text"]) for m in doc["messages"]] == [
        (1, "one"),
        (4, "FOUR"),
        (5, "hi"),
        (9, "nine"),
    ]


def test_file_of_another_timezone_is_replaced_not_merged(make_store: StoreFactory) -> None:
    utc = make_store()
    path = write_day(utc, pages([1, 2, 3]))
    berlin = make_store(timezone="Europe/Berlin")
    assert not berlin.is_complete(KEY, DAY)
    write_day(berlin, pages([2, 5]))
    doc = assert_valid_day_file(path)
    assert doc["timezone"] == "Europe/Berlin"
    assert [m["id"] for m in doc["messages"]] == [2, 5]


def test_is_complete_needs_the_file(store: DayStore) -> None:
    path = write_day(store, pages([1]))
    path.unlink()
    assert not store.is_complete(KEY, DAY)
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert not writer.complete


# --- journal and resume -------------------------------------------------------------------------


def test_restart_resumes_after_the_journal_tail(store: DayStore) -> None:
    writer = store.open_day(KEY, CHAT, DAY)
    for page in pages(range(1, 8)):
        writer.append_page(page)
    crash(writer)
    assert not store.day_path(KEY, DAY).exists()

    with store.open_day(KEY, CHAT, DAY) as writer:
        assert not writer.complete
        assert writer.resume_after_id == 7
        assert writer.journal_count == 7
        writer.append_page([msg(6), msg(7), msg(8)])
        path = writer.finish()
    assert [m["id"] for m in assert_valid_day_file(path)["messages"]] == list(range(1, 9))
    assert not writer.journal_path.exists()


def test_progress_checkpoints_are_batched_by_interval(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(checkpoint_interval_s=10.0)
    writer = store.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1)])  # the first page always checkpoints
    writer.append_page([msg(2)])
    assert store.progress.get(KEY, DAY) == DayProgress(
        False, 1, None, "UTC", "2025-11-08T01:00:03Z"
    )
    clock.advance(10)
    writer.append_page([msg(3)])
    entry = store.progress.get(KEY, DAY)
    assert entry is not None and entry.last_processed_msg_id == 3
    writer.append_page([msg(4)])
    writer.close()  # a clean stop checkpoints what is pending
    entry = store.progress.get(KEY, DAY)
    assert entry is not None and entry.last_processed_msg_id == 4 and not entry.complete


def test_journal_ahead_of_progress_wins(make_store: StoreFactory) -> None:
    store = make_store(checkpoint_interval_s=3600.0)
    writer = store.open_day(KEY, CHAT, DAY)
    for page in pages(range(1, 10)):
        writer.append_page(page)
    crash(writer)
    entry = store.progress.get(KEY, DAY)
    assert entry is not None and entry.last_processed_msg_id == 3
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.resume_after_id == 9


def test_truncated_last_journal_line_is_cut_off(store: DayStore) -> None:
    writer = store.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1), msg(2)])
    journal = writer.journal_path
    crash(writer)
    intact = journal.read_bytes()
    with open(journal, "ab") as fh:
        fh.write(b'{"id":3,"date":"2025-11-07T1')

    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.resume_after_id == 2
        assert journal.read_bytes() == intact
        writer.append_page([msg(3, "whole")])
        path = writer.finish()
    doc = assert_valid_day_file(path)
    assert [(m["id"], m["text"]) for m in doc["messages"]] == [(1, "hi"), (2, "hi"), (3, "whole")]


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x00\n", b'{"id":2,"date":"x"}\n', b'{"id":5,"date":\n', b'{"idx":9}\n'],
    ids=["zeros", "id-not-ascending", "broken-json", "no-id"],
)
def test_journal_is_cut_at_the_first_bad_line(store: DayStore, garbage: bytes) -> None:
    writer = store.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1), msg(2)])
    crash(writer)
    with open(writer.journal_path, "ab") as fh:
        fh.write(garbage + b'{"id":7,"date":"x"}\n')
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.resume_after_id == 2
        path = writer.finish()
    assert [m["id"] for m in assert_valid_day_file(path)["messages"]] == [1, 2]


def test_journal_of_another_timezone_is_discarded(make_store: StoreFactory) -> None:
    utc = make_store()
    writer = utc.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1), msg(2)])
    crash(writer)
    with make_store(timezone="Asia/Tokyo").open_day(KEY, CHAT, DAY) as writer:
        assert writer.resume_after_id == 0
        assert not writer.journal_path.exists()


def test_force_discards_the_journal(store: DayStore) -> None:
    writer = store.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1), msg(2)])
    crash(writer)
    with store.open_day(KEY, CHAT, DAY, force=True) as writer:
        assert writer.resume_after_id == 0
        assert not writer.journal_path.exists()


def test_leftover_temp_file_is_removed_on_open(store: DayStore) -> None:
    path = write_day(store, pages([1]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b'{"half')
    with store.open_day(KEY, CHAT, DAY, force=True):
        assert not tmp.exists()


def test_stale_journal_of_a_complete_day_is_removed(store: DayStore) -> None:
    path = write_day(store, pages([1]))
    journal = path.with_name(".discussions_2025-11-07.partial.jsonl")
    journal.write_bytes(b"leftover\n")
    with store.open_day(KEY, CHAT, DAY) as writer:
        assert writer.complete
    assert not journal.exists()


# --- locking and OS errors ----------------------------------------------------------------------


def test_a_day_has_one_writer_at_a_time(store: DayStore) -> None:
    with store.open_day(KEY, CHAT, DAY), pytest.raises(StorageError, match="locked"):
        store.open_day(KEY, CHAT, DAY)
    with store.open_day(KEY, CHAT, DAY), store.open_day(KEY, CHAT, DAY + timedelta(days=1)):
        pass  # other days are independent


def test_disk_full_on_append_keeps_the_journal_consistent(
    store: DayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.open_day(KEY, CHAT, DAY)
    writer.append_page([msg(1)])
    journal_fd = writer._fd
    real_write = os.write

    def half_write(fd: int, data: Any) -> int:
        if fd == journal_fd:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_write)
    with pytest.raises(StorageError, match="No space left"):
        writer.append_page([msg(2), msg(3)])
    monkeypatch.undo()

    assert writer.last_id == 1
    writer.append_page([msg(2), msg(3)])
    path = writer.finish()
    writer.close()
    assert [m["id"] for m in assert_valid_day_file(path)["messages"]] == [1, 2, 3]


def test_failure_while_writing_the_day_file_keeps_old_file_and_journal(
    store: DayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_day(store, pages([1, 2]))
    before = path.read_bytes()
    writer = store.open_day(KEY, CHAT, DAY, force=True)
    writer.append_page([msg(1, "new"), msg(3)])

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StorageError, match="No space left on device"):
        writer.finish()
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert writer.journal_path.exists()
    assert not path.with_name(f".{path.name}.tmp").exists()
    assert not store.progress.is_complete(KEY, DAY)
    writer.finish()  # the next attempt succeeds from the same journal
    writer.close()
    doc = assert_valid_day_file(path)
    assert [(m["id"], m["text"]) for m in doc["messages"]] == [(1, "new"), (2, "hi"), (3, "hi")]


def test_unwritable_location_is_a_storage_error(store: DayStore, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / KEY).write_text("a file where a directory should be")
    with pytest.raises(StorageError, match="cannot create directory"):
        store.open_day(KEY, CHAT, DAY)


# --- path safety --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", ".", "..", "../etc", "a/b", "/etc", "a\\b", "ключ", "a b", "a\n", "a" * 65, "a.b", "~"],
)
def test_unsafe_chat_keys_are_rejected(store: DayStore, key: str) -> None:
    with pytest.raises(StorageError, match="invalid chat key"):
        store.day_path(key, DAY)
    with pytest.raises(StorageError):
        store.open_day(key, CHAT, DAY)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(max_size=80))
def test_any_chat_key_is_either_rejected_or_stays_under_the_root(store: DayStore, key: str) -> None:
    try:
        path = store.day_path(key, DAY)
    except StorageError:
        assert not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key)
        return
    root = store.data_dir.resolve()
    assert path.resolve().is_relative_to(root)
    assert path.relative_to(store.data_dir).parts == (key, "2025", "discussions_2025-11-07.json")


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_every_safe_chat_key_is_accepted(store: DayStore, key: str) -> None:
    assert validate_chat_key(key) == key
    assert store.day_path(key, DAY).parent.parent.name == key


def test_symlink_out_of_the_root_is_refused(store: DayStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "evil").symlink_to(outside)
    with pytest.raises(StorageError, match="outside the data root"):
        store.open_day("evil", "@evil", DAY)
    assert list(outside.iterdir()) == []


def test_day_must_be_a_date(store: DayStore) -> None:
    with pytest.raises(TypeError):
        store.day_path(KEY, datetime(2025, 11, 7, tzinfo=UTC))


def test_years_are_zero_padded(store: DayStore) -> None:
    assert store.day_path(KEY, date(999, 1, 2)).parts[-2:] == (
        "0999",
        "discussions_0999-01-02.json",
    )


# --- partial days -------------------------------------------------------------------------------


def test_partial_finish_writes_the_file_but_keeps_the_day_open(store: DayStore) -> None:
    with store.open_day(KEY, CHAT, DAY) as writer:
        writer.append_page([msg(1), msg(2)])
        path = writer.finish(complete=False)
    assert [m["id"] for m in assert_valid_day_file(path)["messages"]] == [1, 2]
    assert not store.is_complete(KEY, DAY)
    assert store.progress.get(KEY, DAY) == DayProgress(False, 2, 2, "UTC", "2025-11-08T01:00:03Z")

    with store.open_day(KEY, CHAT, DAY) as writer:
        assert not writer.complete
        assert writer.resume_after_id == 2
        writer.append_page([msg(2), msg(3)])
        writer.finish()
    assert [m["id"] for m in assert_valid_day_file(path)["messages"]] == [1, 2, 3]
    assert store.is_complete(KEY, DAY)
    assert not writer.journal_path.exists()


def test_partial_finish_of_an_empty_day_writes_an_empty_file(store: DayStore) -> None:
    with store.open_day(KEY, CHAT, DAY) as writer:
        path = writer.finish(complete=False)
    assert assert_valid_day_file(path)["message_count"] == 0
    assert not store.is_complete(KEY, DAY)
