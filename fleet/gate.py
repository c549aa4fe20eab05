"""The request gate: the one call the Telegram boundary makes before and after every request.

The worker's Telegram boundary (``worker/telegram.py``) calls :meth:`RequestGate.acquire` before
each Telegram request and :meth:`RequestGate.report` after it. :class:`NullGate` admits
everything (one-shot fetches without Redis); the fleet gate takes tokens from the shared Redis
bucket and honours the shared breaker.
"""

from __future__ import annotations

from typing import Literal, Protocol

RequestClass = Literal["history", "resolve", "other"]
Outcome = Literal["ok", "flood", "transient", "fatal"]
REQUEST_CLASSES: tuple[RequestClass, ...] = ("history", "resolve", "other")


class RequestGate(Protocol):
    async def acquire(self, request_class: RequestClass) -> None:
        """Wait until one request of this class may be sent; may raise ``BreakerOpen``."""

    async def report(
        self, request_class: RequestClass, outcome: Outcome, *, flood_wait_s: float = 0.0
    ) -> None:
        """Record how the request ended (a FloodWait carries its seconds)."""

    async def aclose(self) -> None:
        """Release what the gate holds (connections, background tasks); safe to call twice."""


class NullGate:
    """Admits every request and records nothing."""

    async def acquire(self, request_class: RequestClass) -> None:
        return None

    async def report(
        self, request_class: RequestClass, outcome: Outcome, *, flood_wait_s: float = 0.0
    ) -> None:
        return None

    async def aclose(self) -> None:
        return None
