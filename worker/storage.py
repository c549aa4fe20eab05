"""Day files: ``DATA_DIR/<chat_key>/<YYYY>/discussions_<YYYY-MM-DD>.json`` (CONTRACT §5).

How a day is written, so that a kill at any instant never leaves a half-written file:

1. :meth:`DayStore.open_day` takes an exclusive ``flock`` on ``.discussions_<date>.lock`` next
   to the file (one writer per day, across processes) and recovers the day's journal.
2. :meth:`DayWriter.append_page` appends each page of messages to the journal
   ``.discussions_<date>.partial.jsonl`` (a header line, then one message per line, ids strictly
   ascending). The cost of a page is one ``write`` of that page, whatever the day's size. Every
   ``checkpoint_interval_s`` the journal is fsynced and ``progress.json`` records the day's
   ``last_processed_msg_id``.
3. :meth:`DayWriter.finish` streams a merge of the existing day file (if any) and the journal,
   both sorted by id (on equal ids the fresh message wins), into ``.discussions_<date>.json.tmp``,
   fsyncs it, ``os.replace``s it over the day file and fsyncs the directory; then marks the day
   complete in ``progress.json`` and deletes the journal. Memory stays bounded: the merge runs
   twice over the files (count first, so that ``message_count`` precedes ``messages``).

A restart resumes after the journal's last complete line (a line cut by a kill is truncated
away). The journal is the only place fetched-but-unfinished messages live, so it, not the id in
``progress.json``, decides where to resume; ``progress.json`` can only lag behind it.

Day files are written one message per line inside the ``messages`` array, with ``id`` first and
compact separators, so the same messages always give the same bytes and the file can be read
back as a stream (:func:`worker.dayfile.iter_day_messages`).

The journal's format lives in :mod:`worker.journal`, one day's writer in :mod:`worker.daywriter`,
the locks and error classification in :mod:`worker.diskio`. Everything here blocks on file I/O;
async callers use ``asyncio.to_thread``. A ``DayWriter`` is used by one thread at a time.
"""

from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.clock import Clock, SystemClock
from worker.dayfile import validate_chat_key
from worker.daywriter import DayWriter
from worker.diskio import acquire_fd_lock, os_error
from worker.errors import StorageError
from worker.journal import journal_path
from worker.progress import ProgressStore

if TYPE_CHECKING:
    from worker.settings import WorkerSettings


class DayStore:
    """Where day files live and how they are opened for writing."""

    def __init__(
        self,
        data_dir: Path,
        *,
        schema_version: str,
        timezone: str,
        clock: Clock | None = None,
        progress: ProgressStore | None = None,
        lock_timeout_s: float = 30.0,
        checkpoint_interval_s: float = 5.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.schema_version = schema_version
        self.timezone = timezone
        self.clock: Clock = clock or SystemClock()
        self.lock_timeout_s = lock_timeout_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.progress = progress or ProgressStore(
            self.data_dir,
            schema_version=schema_version,
            timezone=timezone,
            clock=self.clock,
            lock_timeout_s=lock_timeout_s,
        )

    def day_path(self, chat_key: str, day: date) -> Path:
        """``DATA_DIR/<chat_key>/<YYYY>/discussions_<YYYY-MM-DD>.json``, checked to stay inside."""
        validate_chat_key(chat_key)
        if not isinstance(day, date) or isinstance(day, datetime):
            raise TypeError(f"day must be a datetime.date, got {type(day).__name__}")
        path = self.data_dir / chat_key / f"{day.year:04d}" / f"discussions_{day.isoformat()}.json"
        # Defence in depth: the key is already safe, but a symlink under the root could still
        # point elsewhere.
        root = self.data_dir.resolve()
        if not path.resolve().is_relative_to(root):
            raise StorageError(f"{path} resolves outside the data root {root}")
        return path

    def is_complete(self, chat_key: str, day: date) -> bool:
        """The day was completed under the current time zone and its file is there."""
        path = self.day_path(chat_key, day)
        return self.progress.is_complete(chat_key, day) and path.exists()

    def sweep_journal(self, chat_key: str, chat_display: str, day: date) -> bool:
        """Delete the journal a complete day still has (a kill between marking the day complete
        and deleting its journal): a skipped day is never opened again, so without this the
        journal would stay forever. Opening the day under its lock deletes it (a forced refetch
        holding the lock keeps its own journal). True if there was one."""
        path = self.day_path(chat_key, day)
        if not journal_path(path, day).exists():
            return False
        with self.open_day(chat_key, chat_display, day):
            return True

    def open_day(
        self, chat_key: str, chat_display: str, day: date, *, force: bool = False
    ) -> DayWriter:
        """Lock the day (waiting up to ``lock_timeout_s``) and prepare to write it.

        ``force`` fetches the day again from the start even if it is complete; the result is
        still merged with the existing file by :meth:`DayWriter.finish`.
        """
        path = self.day_path(chat_key, day)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error("create directory", path.parent, exc) from exc
        path = self.day_path(chat_key, day)  # re-checked now that the directories exist
        lock_fd = acquire_fd_lock(
            path.with_name(f".discussions_{day.isoformat()}.lock"),
            self.lock_timeout_s,
            f"day {chat_key}/{day.isoformat()}",
        )
        try:
            return DayWriter(self, chat_key, chat_display, day, path, lock_fd, force=force)
        except BaseException:
            os.close(lock_fd)
            raise


def store_from_settings(settings: WorkerSettings, clock: Clock | None = None) -> DayStore:
    """The data root as the settings describe it (the one way programs build a DayStore)."""
    return DayStore(
        settings.data_dir,
        schema_version=settings.schema_version,
        timezone=settings.day_timezone,
        clock=clock,
        lock_timeout_s=settings.storage_lock_timeout_seconds,
        checkpoint_interval_s=settings.progress_checkpoint_seconds,
    )
