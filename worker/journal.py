"""A day's journal, ``.discussions_<date>.partial.jsonl``: the only place fetched-but-unfinished
messages live (see :mod:`worker.storage` for how it fits in writing a day).

A header line names what the journal was written for (schema, time zone, chat, day); then one
message per line, ids strictly ascending. A kill can cut the last line: :func:`recover` keeps the
valid prefix, so a restart resumes after the last complete message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from worker.dayfile import ID_PREFIX, JOURNAL_KIND
from worker.errors import StorageError


def journal_path(day_path: Path, day: date) -> Path:
    """Where the journal of the day file ``day_path`` lives (beside it, hidden)."""
    return day_path.with_name(f".discussions_{day.isoformat()}.partial.jsonl")


def journal_header(schema_version: str, timezone: str, chat_key: str, day: date) -> bytes:
    """The first line: a journal written for anything else is discarded, not resumed."""
    header = {
        "journal": JOURNAL_KIND,
        "schema_version": schema_version,
        "timezone": timezone,
        "chat_key": chat_key,
        "date": day.isoformat(),
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def recover(path: Path, header: bytes, log: Any) -> tuple[int, int]:
    """Keep the journal's valid prefix; return its last id and message count (0, 0 if none)."""
    try:
        fh = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return 0, 0
    started = time.perf_counter()
    with fh:
        if fh.readline() != header:
            fh.close()
            log.warning(
                "discarding {}: written for another time zone, schema or day, or damaged",
                path.name,
            )
            path.unlink()
            return 0, 0
        good_end = fh.tell()
        last_id, count = 0, 0
        for line in fh:
            match = ID_PREFIX.match(line)
            if not line.endswith(b"\n") or not match or int(match.group(1)) <= last_id:
                break
            try:
                json.loads(line)
            except ValueError:
                break
            last_id = int(match.group(1))
            count += 1
            good_end += len(line)
        size = os.fstat(fh.fileno()).st_size
        if good_end < size:
            log.warning(
                "{}: dropping {} bytes after the last complete line (interrupted write)",
                path.name,
                size - good_end,
            )
            fh.truncate(good_end)
    log.debug(
        "journal recovered: {} messages, last id {}, in {:.1f} ms",
        count,
        last_id,
        (time.perf_counter() - started) * 1000,
    )
    return last_id, count


def journal_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The journal's (id, line) stream without the header, in id order; empty if there is none."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with fh:
        fh.readline()
        for line in fh:
            match = ID_PREFIX.match(line)
            if match is None:  # cannot happen: every line was written or checked by us
                raise StorageError(f"{path} has an unexpected line")
            yield int(match.group(1)), line[:-1]
