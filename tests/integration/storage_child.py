"""A child process for the storage process tests (started with ``sys.executable -m``).

``progress DATA_DIR WORKER N START_AT``: update N distinct progress entries of chat ``w<WORKER>``
once the wall clock reaches START_AT (so that all children overlap).

``day DATA_DIR N VERSION [--force]``: write the day 2025-11-07 of chat ``big`` with messages
1..N of ``VERSION`` in pages of 100, resuming where an earlier (killed) run stopped; prints
``ready`` once the day is open, ``finishing`` before the day file is written, then ``done PATH``.
"""

from __future__ import annotations

import argparse
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

    days = DayStore(
        args.data_dir, schema_version="1.0.0", timezone="UTC", checkpoint_interval_s=0.0
    )
    with days.open_day(CHAT_KEY, CHAT, DAY, force=args.force) as writer:
        print("ready", flush=True)
        if not writer.complete:
            for start in range(writer.resume_after_id + 1, args.n + 1, PAGE):
                stop = min(start + PAGE, args.n + 1)
                writer.append_page([make_message(i, args.version) for i in range(start, stop)])
        print("finishing", flush=True)
        path = writer.finish()
    print(f"done {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
