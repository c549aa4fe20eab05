"""The health file (seed 000): ``HEALTH_FILE`` (default ``/tmp/.fetcher_healthy``).

The worker rewrites it on every heartbeat (a third of ``WORKER_LEASE_SECONDS``) atomically
(temporary file + ``os.replace``)::

    {"status": "idle", "ts": "2025-11-09T12:34:56Z", "worker_id": "host-sim-1",
     "session": "sim-1", "pid": 123, "current": [{"command_id": "…", "chat": "@x"}],
     "redis": "up", "processed_commands": 12}

``status`` is ``starting`` | ``waiting_session`` | ``idle`` | ``busy`` | ``redis_down`` |
``storage_error`` (its storage failed several commands in a row: it takes none until a probe
write in ``DATA_DIR`` works) | ``stopping``. ``python -m worker check`` (the Docker
``HEALTHCHECK``) exits 0 when the file is younger than ``HEALTH_MAX_AGE_SECONDS`` and the
status is neither ``redis_down`` nor ``storage_error``, else 1 with the reason on stderr.
The file is removed when the worker exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet.clock import utc_iso

UNHEALTHY = frozenset({"redis_down", "storage_error"})


class HealthFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, status: str, **fields: Any) -> None:
        data = {"status": status, "ts": utc_iso(datetime.now(UTC)), "pid": os.getpid(), **fields}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            # A read-only /tmp must not stop the worker; `check` will then report staleness.
            with contextlib.suppress(OSError):
                tmp.unlink()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def check(path: Path, max_age_s: float, *, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, reason)`` from the health file's age (its mtime) and status."""
    try:
        stat = path.stat()
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"{path} does not exist (worker not running?)"
    except (OSError, ValueError) as exc:
        return False, f"{path} unreadable: {exc}"
    if not isinstance(data, dict):
        return False, f"{path} is not a JSON object"
    age = (time.time() if now is None else now) - stat.st_mtime
    status = str(data.get("status", "?"))
    if age > max_age_s:
        return False, f"stale: last written {age:.0f}s ago (max {max_age_s:.0f}s), status {status}"
    if status in UNHEALTHY:
        return False, f"status {status} ({age:.0f}s ago)"
    return True, f"status {status} ({age:.0f}s ago)"
