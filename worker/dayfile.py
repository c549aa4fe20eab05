"""The day-file format (CONTRACT §5): how messages are encoded, read back as a stream, merged.

A day file is one JSON object whose ``messages`` array holds one message per line, ``id`` first,
compact separators: the same messages always give the same bytes, and the file can be streamed
back in id order without loading it (:func:`iter_day_messages`). :func:`merge` combines two
id-sorted streams (the fresh one wins on equal ids). ``worker/storage.py`` builds on these to
journal pages and write files atomically.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

from fleet.clock import utc_iso
from worker.errors import StorageError

CHAT_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Every message line we write starts with its id, so ids are read without parsing the line.
ID_PREFIX = re.compile(rb'\{"id":(\d+)[,}]')
FINAL_HEAD_END = b'"messages":[\n'
FINAL_END = b"]}\n"
JOURNAL_KIND = "discussions-journal"


def validate_chat_key(chat_key: str) -> str:
    """``chat_key`` if it is a safe directory name, else :class:`StorageError`."""
    if (
        not isinstance(chat_key, str)
        or chat_key in {".", ".."}
        or not CHAT_KEY_PATTERN.fullmatch(chat_key)
    ):
        raise StorageError(f"invalid chat key {chat_key!r}: expected 1-64 of [A-Za-z0-9_-]")
    return chat_key


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One message as one line of compact JSON (no newline), ``id`` first, deterministic."""
    ordered = {"id": message["id"], **{k: v for k, v in message.items() if k != "id"}}
    text = json.dumps(
        ordered, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep the file valid UTF-8 by escaping
        return json.dumps(
            ordered,
            ensure_ascii=True,
            separators=(",", ":"),
            allow_nan=False,
            default=_json_default,
        ).encode("ascii")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def check_message(message: object) -> int:
    if not isinstance(message, Mapping):
        raise ValueError(f"a message must be a mapping, got {type(message).__name__}")
    msg_id = message.get("id")
    if not isinstance(msg_id, int) or isinstance(msg_id, bool) or msg_id < 1:
        raise ValueError(f"a message needs a positive integer id, got {msg_id!r}")
    if "date" not in message:
        raise ValueError(f"message {msg_id} has no date")
    return msg_id


class NotStreamable(Exception):
    """The existing day file is not in our one-message-per-line layout."""


def iter_day_messages(path: Path) -> Iterator[dict[str, Any]]:
    """The messages of a day file, streamed (loaded whole only if it is not in our layout)."""
    with open(path, "rb") as fh:
        streamable = fh.readline().endswith(FINAL_HEAD_END)
    if not streamable:
        with open(path, "rb") as fh:
            yield from json.load(fh)["messages"]
        return
    try:
        for _, line in stream_final(path):
            yield json.loads(line)
    except NotStreamable:
        raise StorageError(f"{path} is damaged (not a complete day file)") from None


def stream_final(path: Path) -> Iterator[tuple[int, bytes]]:
    """(id, line) of every message of a day file in our layout; ``NotStreamable`` otherwise."""
    with open(path, "rb") as fh:
        if not fh.readline().endswith(FINAL_HEAD_END):
            raise NotStreamable
        prev = 0
        for line in fh:
            if line == FINAL_END:
                return
            if line.endswith(b",\n"):
                body = line[:-2]
            elif line.endswith(b"\n"):
                body = line[:-1]
            else:
                raise NotStreamable
            match = ID_PREFIX.match(body)
            if not match or int(match.group(1)) <= prev:
                raise NotStreamable
            prev = int(match.group(1))
            yield prev, body
    raise NotStreamable


def read_final_header(path: Path) -> dict[str, Any] | None:
    """The header fields of a day file (everything but ``messages``), ``None`` if unreadable."""
    with open(path, "rb") as fh:
        first = fh.readline()
    if first.endswith(FINAL_HEAD_END):
        with contextlib.suppress(ValueError):
            head = json.loads(first[:-1] + b"]}")
            if isinstance(head, dict):
                return head
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    doc.pop("messages", None)
    return doc


def load_foreign(path: Path) -> list[tuple[int, bytes]]:
    """A day file not in our layout, loaded whole, sorted and deduplicated (last one wins)."""
    with open(path, "rb") as fh:
        doc = json.load(fh)
    by_id: dict[int, bytes] = {}
    for message in doc.get("messages", []) if isinstance(doc, dict) else []:
        with contextlib.suppress(ValueError):
            by_id[check_message(message)] = encode_message(message)
    return sorted(by_id.items())


def merge(
    old: Iterable[tuple[int, bytes]], new: Iterable[tuple[int, bytes]]
) -> Iterator[tuple[int, bytes]]:
    """Merge two id-sorted streams of unique ids; on equal ids the ``new`` line wins."""
    old_it, new_it = iter(old), iter(new)
    a = next(old_it, None)
    b = next(new_it, None)
    while a is not None and b is not None:
        if a[0] < b[0]:
            yield a
            a = next(old_it, None)
        elif a[0] > b[0]:
            yield b
            b = next(new_it, None)
        else:
            yield b
            a = next(old_it, None)
            b = next(new_it, None)
    if a is not None:
        yield a
        yield from old_it
    if b is not None:
        yield b
        yield from new_it
