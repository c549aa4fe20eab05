"""One (chat, day) being written: :class:`DayWriter`, opened by :meth:`DayStore.open_day`.

It holds the day's lock, appends pages to the journal (:mod:`worker.journal`), checkpoints
``progress.json`` and finally writes the day file by streaming a merge of the old file and the
journal; :mod:`worker.storage` describes the whole sequence and why a kill never leaves a
half-written file. A ``DayWriter`` is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from loguru import logger

from fleet.clock import utc_iso
from worker.dayfile import (
    FINAL_END,
    NotStreamable,
    check_message,
    encode_message,
    load_foreign,
    merge,
    read_final_header,
    stream_final,
)
from worker.diskio import fsync_dir, os_error, storage_error
from worker.errors import StorageError
from worker.journal import journal_header, journal_lines, journal_path, recover

if TYPE_CHECKING:
    from worker.progress import DayProgress
    from worker.storage import DayStore


class DayWriter:
    """Writes one (chat, day) while holding its lock; a context manager that releases it."""

    def __init__(
        self,
        store: DayStore,
        chat_key: str,
        chat_display: str,
        day: date,
        path: Path,
        lock_fd: int,
        *,
        force: bool,
    ) -> None:
        self.store = store
        self.chat_key = chat_key
        self.chat_display = chat_display
        self.day = day
        self.path = path
        self.journal_path = journal_path(path, day)
        self.tmp_path = path.with_name(f".{path.name}.tmp")
        self.force = force
        self.new_messages = 0  # appended by this writer
        self.journal_count = 0  # messages in the journal, including earlier attempts
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = None
        self._finished = False
        self._broken = False
        self._dirty = False
        self._last_checkpoint = float("-inf")
        self._log = logger.bind(chat_key=chat_key, day=day.isoformat())

        self._last_id = self._prepare(store.progress.get(chat_key, day))
        self.resume_after_id = self._last_id

    def _prepare(self, entry: DayProgress | None) -> int:
        """Decide whether the day is complete and recover the journal; returns its last id."""
        store, force = self.store, self.force
        try:
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()  # left by a kill during finish; we hold the lock
            self.complete = (
                not force
                and entry is not None
                and entry.complete
                and entry.timezone == store.timezone
                and self.path.exists()
            )
            if self.complete or force:
                # Complete: the journal was merged and its deletion was interrupted.
                # Forced: the day starts over.
                with contextlib.suppress(FileNotFoundError):
                    self.journal_path.unlink()
                last_id = 0
            else:
                last_id, self.journal_count = recover(
                    self.journal_path, self._journal_header(), self._log
                )
        except OSError as exc:
            raise os_error("prepare", self.journal_path, exc) from exc
        if (
            not self.complete
            and not force
            and entry is not None
            and entry.timezone == store.timezone
            and entry.last_processed_msg_id > last_id
        ):
            self._log.warning(
                "progress.json says {} was processed but the journal ends at {}; resuming from "
                "the journal",
                entry.last_processed_msg_id,
                last_id,
            )
        return last_id

    # --- context manager -----------------------------------------------------------------------

    def __enter__(self) -> DayWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Checkpoint what was appended, close the journal and release the day's lock."""
        if self._lock_fd is None:
            return
        try:
            if self._dirty and not self._finished and not self._broken:
                try:
                    self._checkpoint()
                except StorageError as exc:
                    self._log.warning("could not checkpoint progress on close: {}", exc)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- writing -------------------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The highest message id in the journal."""
        return self._last_id

    def append_page(self, messages: list[dict[str, Any]]) -> int:
        """Append the messages with ids above :attr:`last_id`; returns how many were new.

        Pages must come in ascending id order: ids at or below the last one are taken as
        re-sent after a restart and dropped.
        """
        if self._lock_fd is None or self._finished:
            raise RuntimeError("the day writer is closed")
        if self.complete:
            raise RuntimeError("the day is complete; open it with force=True to fetch it again")
        if self._broken:
            # A new writer truncates the journal to its last whole line: retry later.
            raise storage_error(
                f"{self.journal_path} is in an unknown state after a write error", retryable=True
            )
        fresh: dict[int, Mapping[str, Any]] = {}
        for message in messages:
            msg_id = check_message(message)
            if msg_id > self._last_id:
                fresh[msg_id] = message
        if not fresh:
            return 0
        ids = sorted(fresh)
        data = b"".join(encode_message(fresh[i]) + b"\n" for i in ids)
        started = time.perf_counter()
        self._write_journal(data)
        self._last_id = ids[-1]
        self.journal_count += len(ids)
        self.new_messages += len(ids)
        self._dirty = True
        self._log.debug(
            "journal +{} messages ({} bytes, last id {}) in {:.2f} ms",
            len(ids),
            len(data),
            self._last_id,
            (time.perf_counter() - started) * 1000,
        )
        interval = self.store.checkpoint_interval_s
        if self.store.clock.monotonic() - self._last_checkpoint >= interval:
            self._checkpoint()
        return len(ids)

    def finish(self, *, complete: bool = True, header: Mapping[str, Any] | None = None) -> Path:
        """Write the day file once (merge of the old file and the journal) and record it.

        ``complete=False`` is for a day that is not over yet or was cut by a ``limit``: the file
        is written all the same, but the day stays incomplete in ``progress.json`` and the
        journal is kept, so the next run resumes after its last id and merges again.

        ``header`` adds fields to the file's header (CONTRACT §5 allows additions): the
        fetcher's ``chat_id`` and ``completeness``; the latter gets ``missing_ids``, the ids
        absent inside the day's id range (deleted messages, normally).
        """
        if self._lock_fd is None:
            raise RuntimeError("the day writer is closed")
        if self.complete or self._finished:
            return self.path
        if self._broken:
            # A new writer truncates the journal to its last whole line: retry later.
            raise storage_error(
                f"{self.journal_path} is in an unknown state after a write error", retryable=True
            )
        started = time.perf_counter()
        old, (count, max_id, min_id) = self._counted_old()
        extra = dict(header or {})
        if isinstance(extra.get("completeness"), Mapping):
            missing = max_id - min_id + 1 - count if count else 0
            extra["completeness"] = {**extra["completeness"], "missing_ids": missing}
        size = self._write_final(count, merge(old(), journal_lines(self.journal_path)), extra)
        if not complete and self._fd is not None:
            try:
                os.fsync(self._fd)  # the journal outlives this run: make it as durable as the file
            except OSError as exc:
                raise os_error("sync", self.journal_path, exc) from exc
        self.store.progress.update(
            self.chat_key,
            self.day,
            complete=complete,
            last_processed_msg_id=max(self._last_id, max_id) if complete else self._last_id,
            message_count=count,
        )
        self._release_journal(delete=complete)
        self._finished = True
        self._dirty = False
        self._log.debug(
            "day file written ({}): {} messages, {} bytes, in {:.1f} ms",
            "complete" if complete else "partial",
            count,
            size,
            (time.perf_counter() - started) * 1000,
        )
        return self.path

    def _counted_old(
        self,
    ) -> tuple[Callable[[], Iterator[tuple[int, bytes]]], tuple[int, int, int]]:
        """The existing file's stream factory and the merge's count (see :meth:`_count`)."""
        old = self._old_messages()
        try:
            try:
                return old, self._count(old)
            except NotStreamable:
                self._log.warning("{} is not in the streaming layout; merging in memory", self.path)
                loaded = load_foreign(self.path)
                old = lambda: iter(loaded)  # noqa: E731
                return old, self._count(old)
        except OSError as exc:
            raise os_error("read", self.path, exc) from exc

    def _release_journal(self, *, delete: bool) -> None:
        """Close the journal after the day file is written; delete it once the day is done."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete:
            try:
                self.journal_path.unlink(missing_ok=True)
            except OSError as exc:  # harmless: a complete day's journal is removed on next open
                self._log.warning("could not delete {}: {}", self.journal_path, exc)

    def _count(self, old: Callable[[], Iterator[tuple[int, bytes]]]) -> tuple[int, int, int]:
        """First pass of the merge: how many messages, the highest and the lowest id."""
        count, max_id, min_id = 0, 0, 0
        for msg_id, _ in merge(old(), journal_lines(self.journal_path)):
            if not count:
                min_id = msg_id
            count += 1
            max_id = msg_id
        return count, max_id, min_id

    # --- journal -------------------------------------------------------------------------------

    def _journal_header(self) -> bytes:
        store = self.store
        return journal_header(store.schema_version, store.timezone, self.chat_key, self.day)

    def _write_journal(self, data: bytes) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(
                    self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
                )
                if os.fstat(self._fd).st_size == 0:
                    data = self._journal_header() + data
        except OSError as exc:
            raise os_error("open", self.journal_path, exc) from exc
        before = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            # Cut the partial page off so that the next page does not follow half a line.
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                self._broken = True
            raise os_error("append to", self.journal_path, exc) from exc

    def _checkpoint(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)  # the progress entry never gets ahead of durable messages
            except OSError as exc:
                raise os_error("sync", self.journal_path, exc) from exc
        self.store.progress.update(
            self.chat_key,
            self.day,
            complete=False,
            last_processed_msg_id=self._last_id,
            message_count=None,
        )
        self._dirty = False
        self._last_checkpoint = self.store.clock.monotonic()

    # --- final file ----------------------------------------------------------------------------

    def _old_messages(self) -> Callable[[], Iterator[tuple[int, bytes]]]:
        """A factory of the existing file's (id, line) stream, empty if it must not be merged."""
        try:
            header = read_final_header(self.path)
        except FileNotFoundError:
            return lambda: iter(())
        except OSError as exc:
            raise os_error("read", self.path, exc) from exc
        if header is None:
            self._log.warning("{} is not valid JSON; it will be replaced", self.path)
            return lambda: iter(())
        if header.get("timezone") != self.store.timezone:
            # Its days were cut in another zone: its messages do not belong to this day.
            self._log.warning(
                "{} was written for time zone {!r}, not {!r}; it will be replaced, not merged",
                self.path,
                header.get("timezone"),
                self.store.timezone,
            )
            return lambda: iter(())
        return lambda: stream_final(self.path)

    def _write_final(
        self,
        count: int,
        lines: Iterator[tuple[int, bytes]],
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        header = {
            "schema_version": self.store.schema_version,
            "timezone": self.store.timezone,
            "chat": self.chat_display,
            "date": self.day.isoformat(),
            "message_count": count,
            "fetched_at": utc_iso(self.store.clock.now()),
            **(extra or {}),
        }
        head = json.dumps(header, ensure_ascii=False, separators=(",", ":"))[:-1]
        written = 0
        try:
            with open(self.tmp_path, "wb", buffering=1 << 20) as fh:
                fh.write(head.encode() + b',"messages":[')
                sep = b"\n"
                for _, line in lines:
                    fh.write(sep)
                    fh.write(line)
                    sep = b",\n"
                    written += 1
                fh.write(b"\n" + FINAL_END)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            if written != count:  # the inputs changed between the two passes: cannot happen
                raise StorageError(f"{self.path}: counted {count} messages but wrote {written}")
            os.replace(self.tmp_path, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()
            raise os_error("write", self.path, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()
            raise
        return size
