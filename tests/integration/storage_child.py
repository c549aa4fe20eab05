"""A child process for the storage process tests (started with ``sys.executable -m``).

``progress DATA_DIR WORKER N START_AT``: update N distinct progress entries of chat ``w<WORKER>``
once the wall clock reaches START_AT (so that all children overlap).

``day DATA_DIR N VERSION [--force] [--trace FILE] [--stop-at K | --tear-at K]``: write the day
2025-11-07 of chat ``big`` with messages 1..N of ``VERSION`` in pages of 100, resuming where an
earlier (killed) run stopped; prints ``ready`` once the day is open, ``finishing`` before the
day file is written, then ``done PATH``.

Deterministic kill points: after ``ready``, every durable step the storage takes is counted —
``write`` (a journal append), ``fsync``, ``replace``, ``unlink``, each with the file's name.
``--trace FILE`` writes the list (``<phase> <op>:<name>`` per line, phase ``page`` or
``finish``). ``--stop-at K`` stops *before* step K (1-based): prints ``stopped K <op>`` and
waits to be killed. ``--tear-at K`` (step K must be a ``write``) writes only the first half of
its bytes, a torn journal line, before stopping the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

DAY = date(2025, 11, 7)
CHAT_KEY = "big"
CHAT = "@big"
PAGE = 100


def make_message(msg_id: int, version: int) -> dict[str, Any]:
    """Message ``msg_id`` as fetched in ``version``; every 7th message changes between versions."""
    edited = version if msg_id % 7 == 0 else 1
    return {
        "id": msg_id,
        "date": f"2025-11-07T{msg_id // 3600 % 24:02d}:{msg_id // 60 % 60:02d}:{msg_id % 60:02d}Z",
        "from_id": 1000 + msg_id % 31,
        "chat": CHAT,
        "text": f"сообщение {msg_id} edit {edited} " + "lorem ipsum " * 8,
        "reply_to": msg_id - 1 if msg_id % 3 == 0 else None,
        "views": 100 + msg_id,
        "forwards": msg_id % 5,
        "replies_count": msg_id % 4,
        "entities": [{"type": "url", "offset": 0, "length": 5}] if msg_id % 2 else [],
    }


class KillPoints:
    """Counts the storage's durable steps (patched ``os`` functions, this child only) and stops
    at the one asked for, so the parent's SIGKILL lands exactly there."""

    def __init__(self, root: Path, stop_at: int | None, tear_at: int | None) -> None:
        self.root = root.resolve()
        self.stop_at, self.tear_at = stop_at, tear_at
        self.steps: list[str] = []
        self.phase = ""  # "" until the day is open: opening is not counted
        self._real = {name: getattr(os, name) for name in ("write", "fsync", "replace", "unlink")}
        os.write = self._write  # type: ignore[assignment]
        os.fsync = lambda fd: self._step(
            "fsync", self._fd_name(fd), lambda: self._real["fsync"](fd)
        )
        os.replace = lambda src, dst, **kw: self._step(  # type: ignore[assignment]
            "replace", self._name(dst), lambda: self._real["replace"](src, dst, **kw)
        )
        os.unlink = lambda path, **kw: self._step(  # type: ignore[assignment]
            "unlink", self._name(path), lambda: self._real["unlink"](path, **kw)
        )

    def _name(self, path: Any) -> str:
        """The path relative to the data directory (the same in every trial's directory)."""
        resolved = Path(path).resolve()
        return str(resolved.relative_to(self.root)) if resolved.is_relative_to(self.root) else "?"

    def _fd_name(self, fd: int) -> str:
        try:
            return self._name(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return "?"

    def _step(self, op: str, name: str, run: Any) -> Any:
        if not self.phase:
            return run()
        self.steps.append(f"{self.phase} {op}:{name}")
        if len(self.steps) == self.stop_at:
            self._stop()
        return run()

    def _write(self, fd: int, data: Any) -> int:
        write = self._real["write"]
        if not self.phase:
            return int(write(fd, data))
        self.steps.append(f"{self.phase} write:{self._fd_name(fd)}")
        k = len(self.steps)
        if k == self.tear_at:
            write(fd, bytes(data)[: len(data) // 2])
            self._stop()
        if k == self.stop_at:
            self._stop()
        return int(write(fd, data))

    def _stop(self) -> None:
        print(f"stopped {len(self.steps)} {self.steps[-1]}", flush=True)
        while True:  # the parent kills us here
            time.sleep(60)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    prog = sub.add_parser("progress")
    prog.add_argument("data_dir", type=Path)
    prog.add_argument("worker", type=int)
    prog.add_argument("n", type=int)
    prog.add_argument("start_at", type=float)
    day = sub.add_parser("day")
    day.add_argument("data_dir", type=Path)
    day.add_argument("n", type=int)
    day.add_argument("version", type=int)
    day.add_argument("--force", action="store_true")
    day.add_argument("--trace", type=Path)
    point = day.add_mutually_exclusive_group()
    point.add_argument("--stop-at", type=int)
    point.add_argument("--tear-at", type=int)
    args = parser.parse_args(argv)

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    from worker.progress import ProgressStore
    from worker.storage import DayStore

    if args.cmd == "progress":
        store = ProgressStore(args.data_dir, schema_version="1.0.0", timezone="UTC")
        time.sleep(max(0.0, args.start_at - time.time()))
        for j in range(args.n):
            store.update(
                f"w{args.worker}",
                date(2024, 1, 1) + timedelta(days=j),
                complete=j % 2 == 0,
                last_processed_msg_id=j + 1,
                message_count=j,
            )
        return 0

    args.data_dir.mkdir(parents=True, exist_ok=True)
    kills = KillPoints(args.data_dir, args.stop_at, args.tear_at)
    days = DayStore(
        args.data_dir, schema_version="1.0.0", timezone="UTC", checkpoint_interval_s=0.0
    )
    with days.open_day(CHAT_KEY, CHAT, DAY, force=args.force) as writer:
        print("ready", flush=True)
        kills.phase = "page"
        if not writer.complete:
            for start in range(writer.resume_after_id + 1, args.n + 1, PAGE):
                stop = min(start + PAGE, args.n + 1)
                writer.append_page([make_message(i, args.version) for i in range(start, stop)])
        print("finishing", flush=True)
        kills.phase = "finish"
        path = writer.finish()
    kills.phase = ""
    if args.trace is not None:
        args.trace.write_text("".join(f"{step}\n" for step in kills.steps))
    print(f"done {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
