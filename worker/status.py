"""What the worker reports about itself: its status in the health file, ``/health`` and
``/health/details``.

The status words are :mod:`worker.health`'s. The daemon sets the explicit ones (``starting``,
``waiting_session``, ``storage_error``, ``stopping``); :func:`write_health` with no status
derives the rest on every heartbeat (``redis_down`` while the link is down, ``busy`` / ``idle``
from the running commands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet.exporters import health_details

if TYPE_CHECKING:
    from worker.daemon import Daemon

BREAKER = "telegram"  # the breaker_state{component} of the shared Telegram breaker


def write_health(d: Daemon, status: str | None = None) -> None:
    """Set the status (or derive it) and rewrite the health file."""
    if status is not None:
        d.status = status
    elif d.stop.is_set():
        d.status = "stopping"
    elif not d.link.up:
        d.status = "redis_down"
    elif d.status in ("idle", "busy"):
        d.status = "busy" if d.running else "idle"
    d.health.write(
        d.status,
        worker_id=d.worker_id,
        session=d.session_name,
        redis="up" if d.link.up else "down",
        served=d.tally.served,
        current=[
            {"command_id": r.cmd.command_id, "chat": r.cmd.chat.display} for r in d.running.values()
        ],
    )


def healthy(d: Daemon) -> bool:
    """``/health``: 200 while taking commands with Redis reachable, else 503. Runs in the
    HTTP server's thread: reads plain attributes only."""
    return d.status in ("idle", "busy") and d.link.up and not d.stop.is_set()


def details(d: Daemon, version: str) -> dict[str, object]:
    """``/health/details``. Runs in the HTTP server's thread: copies the running map first."""
    running = [
        {
            "command_id": r.cmd.command_id,
            "chat": r.cmd.chat.display,
            "mode": r.cmd.mode,
            "started": r.started_at,
        }
        for r in list(d.running.values())
    ]
    telegram = d.telegram
    return health_details(
        version=version,
        telegram_connected=bool(telegram is not None and telegram.connected),
        session=d.session_name,
        redis_ok=d.link.up,
        breaker=d.metrics.breaker_state_of(BREAKER),
        current_command=running[0] if running else None,
        last_success=d.tally.last_success,
        worker_id=d.worker_id,
        status=d.status,
        running=running,
        commands_served=d.tally.served,
        last_command=d.tally.last_command,
    )


__all__ = ["BREAKER", "details", "healthy", "write_health"]
