"""The simulated world's *now*, movable from outside: messages that arrive at runtime.

Issue 14's incremental fetches need new messages to appear between two scheduler ticks, in
every worker process at once; this clock is how the history grows on demand without any
process sharing memory (see :class:`Horizon`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path


class Horizon:
    """A clock for :class:`World` that lets messages appear at runtime, on demand.

    With ``SIM_HORIZON_FILE`` set, the world's *now* is the earlier of the real clock and the
    Unix time written in that file (re-read when the file changes; absent or unreadable: the
    real clock). Raising the number appends to the chats, in every worker process at once,
    exactly the messages the deterministic history has between the old and the new horizon —
    so a test can make "new messages" arrive between two scheduler ticks and still compare the
    result with a one-shot fetch of the same world. Keep it within today: the worker's notion
    of a complete day follows the real clock.
    """

    def __init__(self, now: Callable[[], datetime], path: Path) -> None:
        self._now = now
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value: datetime | None = None

    def __call__(self) -> datetime:
        real = self._now()
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # write it with os.replace
            if stamp != self._stamp:
                raw = self._path.read_text(encoding="utf-8").strip()
                self._value = datetime.fromtimestamp(float(raw), UTC) if raw else None
                self._stamp = stamp
        except (OSError, ValueError, OverflowError):
            return real
        return real if self._value is None else min(real, self._value)
