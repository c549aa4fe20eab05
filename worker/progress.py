"""``DATA_DIR/progress.json``: per (chat, day) whether the day is complete and how far it got.

Layout (``worker/schemas/progress.schema.json``)::

    {"schema_version": "1.0.0", "timezone": "UTC",
     "chats": {"ru_python": {"2025-11-07": {"complete": true, "last_processed_msg_id": 123,
                                            "message_count": 2, "timezone": "UTC",
                                            "updated_at": "2025-11-08T01:00:03Z"}}}}

The authoritative record is per chat: ``DATA_DIR/<chat_key>/.progress.json`` (the same entries,
``{"schema_version", "timezone", "chat_key", "days": {date: entry}}``), updated under that chat's
own lock ``DATA_DIR/<chat_key>/.progress.lock``: re-read, change one entry, write a temporary
file, fsync, ``os.replace``, so no update is lost and a reader (no lock) sees a whole file. A
process stalled while holding a lock (SIGSTOP, a hung NFS call) stalls that one chat only.

``progress.json`` is a derived, readable copy of every chat's record (CONTRACT §5), rewritten
after each update under ``DATA_DIR/.progress.lock`` taken with a short timeout: when that lock is
held too long the copy is skipped (a debug line) and the next update of any chat rebuilds it
from all chat records. Readers in the worker use the chat records; a chat without one yet (data
written by an older version) is read from ``progress.json``, and its first update seeds its
record from there.

Storage errors are classified as :mod:`worker.diskio` describes (errors of the environment are
retryable), and the locks are its bounded ``flock``s.

Completion is decided by this file alone: a day file on disk without a ``complete`` entry here
(written under the current ``timezone``) is fetched again and merged, never trusted blindly. A
``progress.json`` that cannot be parsed is renamed to ``progress.json.corrupt-<ts>`` with a
warning and treated as empty, so a damaged file costs a re-fetch, never a crash loop.

All calls block on file I/O (and on the lock, up to ``lock_timeout_s``); async callers use
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from loguru import logger

from fleet.clock import Clock, SystemClock, utc_iso
from worker.diskio import acquire_fd_lock, file_lock, fsync_dir, storage_error
from worker.errors import StorageError

PROGRESS_FILE = "progress.json"
PROGRESS_LOCK = ".progress.lock"
CHAT_PROGRESS_FILE = ".progress.json"  # in DATA_DIR/<chat_key>/
COPY_LOCK_TIMEOUT_S = 0.5  # the derived progress.json is skipped behind a stalled holder


@dataclass(frozen=True, slots=True)
class DayProgress:
    """One (chat, day) entry of ``progress.json``."""

    complete: bool
    last_processed_msg_id: int
    message_count: int | None
    timezone: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "last_processed_msg_id": self.last_processed_msg_id,
            "message_count": self.message_count,
            "timezone": self.timezone,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, raw: object) -> DayProgress | None:
        """The entry, or ``None`` if it is malformed (then the day counts as not fetched)."""
        if not isinstance(raw, dict):
            return None
        complete = raw.get("complete")
        last_id = raw.get("last_processed_msg_id")
        count = raw.get("message_count")
        tz = raw.get("timezone")
        updated = raw.get("updated_at", "")
        if (
            not isinstance(complete, bool)
            or not _is_int(last_id)
            or not (count is None or _is_int(count))
            or not isinstance(tz, str)
            or not isinstance(updated, str)
        ):
            return None
        return cls(complete, last_id, count, tz, updated)  # type: ignore[arg-type]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ProgressStore:
    """Reads and updates ``DATA_DIR/progress.json``; safe across threads and processes."""

    def __init__(
        self,
        data_dir: Path,
        *,
        schema_version: str,
        timezone: str,
        clock: Clock | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / PROGRESS_FILE
        self.lock_path = self.data_dir / PROGRESS_LOCK
        self.schema_version = schema_version
        self.timezone = timezone
        self.clock: Clock = clock or SystemClock()
        self.lock_timeout_s = lock_timeout_s

    # --- reading -------------------------------------------------------------------------------

    def chat_path(self, chat_key: str) -> Path:
        """The chat's own progress record (authoritative)."""
        return self.data_dir / chat_key / CHAT_PROGRESS_FILE

    def chat_lock_path(self, chat_key: str) -> Path:
        return self.data_dir / chat_key / PROGRESS_LOCK

    def get(self, chat_key: str, day: date) -> DayProgress | None:
        """The entry for (chat, day), whatever time zone it was written under."""
        days = self._days(chat_key)
        if days is None:
            return None
        return DayProgress.from_json(days.get(day.isoformat()))

    def _days(self, chat_key: str) -> dict[str, Any] | None:
        """The chat's entries: its own record, else (older data) its section of the copy."""
        from worker.dayfile import validate_chat_key

        with contextlib.suppress(StorageError):
            validate_chat_key(chat_key)
            days = self._chat_days(chat_key)
            if days is not None:
                return days
        found = self._read_unlocked()["chats"].get(chat_key)
        return found if isinstance(found, dict) else None

    def _chat_days(self, chat_key: str) -> dict[str, Any] | None:
        """The days of the chat's own record; ``None`` if it has none (or it is damaged: then
        the copy is read, and the next update rewrites the record)."""
        path = self.chat_path(chat_key)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise storage_error(f"cannot read {path}: {exc.strerror or exc}", exc) from exc
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("days"), dict):
            logger.warning("{} is damaged; reading progress.json instead", path)
            return None
        days: dict[str, Any] = doc["days"]
        return days

    def is_complete(self, chat_key: str, day: date) -> bool:
        """True if the day was completed under the current time zone."""
        entry = self.get(chat_key, day)
        return entry is not None and entry.complete and entry.timezone == self.timezone

    def snapshot(self) -> dict[str, Any]:
        """The whole document as ``progress.json`` should read (empty if there is nothing),
        built from every chat's record over the copy."""
        doc = self._read_unlocked()
        self._merge_chat_records(doc)
        return doc

    # --- writing -------------------------------------------------------------------------------

    def update(
        self,
        chat_key: str,
        day: date,
        *,
        complete: bool,
        last_processed_msg_id: int,
        message_count: int | None,
    ) -> DayProgress:
        """Set the entry for (chat, day) under the lock; other entries are kept as they are."""
        from worker.dayfile import validate_chat_key

        validate_chat_key(chat_key)
        entry = DayProgress(
            complete=complete,
            last_processed_msg_id=last_processed_msg_id,
            message_count=message_count,
            timezone=self.timezone,
            updated_at=utc_iso(self.clock.now()),
        )
        self._ensure_dir()
        chat_dir = self.data_dir / chat_key
        try:
            chat_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise storage_error(f"cannot create {chat_dir}: {exc.strerror or exc}", exc) from exc
        started = time.perf_counter()
        with file_lock(
            self.chat_lock_path(chat_key), self.lock_timeout_s, f"progress of {chat_key}"
        ):
            days = self._chat_days(chat_key)
            if days is None:  # first update since an older version wrote only the copy
                seeded = self._read_unlocked()["chats"].get(chat_key)
                days = dict(seeded) if isinstance(seeded, dict) else {}
            days[day.isoformat()] = entry.to_json()
            record = {
                "schema_version": self.schema_version,
                "timezone": self.timezone,
                "chat_key": chat_key,
                "days": dict(sorted(days.items())),
            }
            size = self._write_json(self.chat_path(chat_key), record)
            # Still under the chat's lock, so that copies of this chat are written in order.
            self._refresh_copy()
        logger.bind(chat_key=chat_key, day=day.isoformat()).debug(
            "progress.json updated (complete={}, last_id={}, {} bytes) in {:.1f} ms",
            complete,
            last_processed_msg_id,
            size,
            (time.perf_counter() - started) * 1000,
        )
        return entry

    # --- internals -----------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(
                f"cannot create {self.data_dir}: {exc.strerror or exc}", exc
            ) from exc

    def _empty(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "timezone": self.timezone, "chats": {}}

    def _read_unlocked(self) -> dict[str, Any]:
        doc = self._parse()
        if doc is not None:
            return doc
        if not self.path.exists():
            return self._empty()
        # Corrupt: set it aside under the lock, unless a writer replaced it meanwhile.
        self._ensure_dir()
        with file_lock(self.lock_path, self.lock_timeout_s, "progress.json"):
            return self._load(locked=True)

    def _load(self, *, locked: bool) -> dict[str, Any]:
        """Read the document; with the lock held, a corrupt file is renamed aside."""
        doc = self._parse()
        if doc is not None:
            return doc
        if locked and self.path.exists():
            self._set_aside()
        return self._empty()

    def _parse(self) -> dict[str, Any] | None:
        """The document, an empty one if there is no file, ``None`` if it is corrupt."""
        started = time.perf_counter()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._empty()
        except OSError as exc:
            raise storage_error(f"cannot read {self.path}: {exc.strerror or exc}", exc) from exc
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("chats"), dict):
            return None
        logger.debug(
            "progress.json read ({} bytes) in {:.1f} ms",
            len(raw),
            (time.perf_counter() - started) * 1000,
        )
        return doc

    def _set_aside(self) -> None:
        stamp = self.clock.now().strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{PROGRESS_FILE}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{PROGRESS_FILE}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise storage_error(
                f"{self.path} is corrupt and cannot be moved aside: {exc.strerror or exc}", exc
            ) from exc
        logger.warning(
            "progress.json is corrupt: moved to {} and starting from an empty one "
            "(days will be fetched again and merged with their files)",
            target.name,
        )

    def _merge_chat_records(self, doc: dict[str, Any]) -> None:
        try:
            records = sorted(self.data_dir.glob(f"*/{CHAT_PROGRESS_FILE}"))
        except OSError:
            return
        for path in records:
            with contextlib.suppress(StorageError):
                days = self._chat_days(path.parent.name)
                if days is not None:
                    doc["chats"][path.parent.name] = days

    def _refresh_copy(self) -> None:
        """Rewrite ``progress.json`` from every chat's record; skipped (never fatal) when its
        lock is held longer than ``COPY_LOCK_TIMEOUT_S`` or it cannot be written: the chat
        records are the truth, and the next update rebuilds the whole copy."""
        try:
            fd = acquire_fd_lock(self.lock_path, COPY_LOCK_TIMEOUT_S, "progress.json")
        except StorageError as exc:
            logger.debug("progress.json copy skipped: {}", exc)
            return
        try:
            doc = self._load(locked=True)
            self._merge_chat_records(doc)
            self._write(doc)
        except StorageError as exc:
            logger.warning("progress.json copy not written: {}", exc)
        finally:
            os.close(fd)

    def _write_json(self, path: Path, doc: dict[str, Any]) -> int:
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(f"cannot write {path}: {exc.strerror or exc}", exc) from exc
        return len(data)

    def _write(self, doc: dict[str, Any]) -> int:
        # Sorted, so the file diffs well and does not depend on who wrote first.
        out = {
            "schema_version": self.schema_version,
            "timezone": self.timezone,
            "chats": {
                key: dict(sorted(days.items()))
                for key, days in sorted(doc["chats"].items())
                if isinstance(days, dict)
            },
        }
        return self._write_json(self.path, out)
