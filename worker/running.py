"""What this worker is running and what its executions did: :class:`Running`, :class:`Tally`.

Shared by the daemon (health file, ``/health/details``, heartbeat, shutdown summary) and the
executor (which writes them); plain attributes, because the HTTP server's thread reads them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from worker.commands import FetchCommand


@dataclass
class Running:
    """One command being executed by this worker."""

    entry: bytes  # as it is in the processing list
    cmd: FetchCommand
    started: float  # the executor's clock, monotonic
    started_at: str  # UTC, ISO 8601
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    taken_over: bool = False  # the lease expired and another worker may run it


@dataclass
class Tally:
    """What this worker's executions did so far, for the health file, ``/health/details``, the
    lag metric and the shutdown summary. Plain attributes: the HTTP server's thread reads them."""

    served: int = 0
    last_success: str | None = None
    last_command: dict[str, Any] | None = None
    # chat label -> unix time its data is current to
    fresh_until: dict[str, float] = field(default_factory=dict)


__all__ = ["Running", "Tally"]
