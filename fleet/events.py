"""Lifecycle events (CONTRACT §4): built here, published on ``tg_events`` and appended to a
capped stream.

Every event carries ``event``, ``command_id``, ``chat``, ``mode``, ``params``, ``processed``,
``errors``, ``duration_sec``, ``status``, ``ts`` (UTC, ``Z``), ``worker_id`` and ``service``;
``failed`` adds ``error: {type, message}`` and ``retryable``; ``completed`` adds ``files``.
For one execution a command gets ``started``, zero or more (throttled) ``progress``, and exactly
one terminal event — except an execution interrupted by a shutdown or a revoked session, which
ends with no terminal event because the command goes back to the queue and its next execution
will end it (nothing false is published).

``status`` is ``running`` (started, progress), ``ok`` (completed, every day complete),
``partial`` (completed, but a day was cut by ``limit`` or is today's, still going on), or
``error`` (failed).

Publishing (PUBLISH + XADD ``events`` MAXLEN ~) is retried with exponential backoff and jitter
while Redis is unreachable, up to ``EVENT_PUBLISH_MAX_SECONDS``; then the event is given up
with one log line. It never raises: a fetch that succeeded is not failed by its event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from loguru import logger
from redis.asyncio import Redis
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from fleet.clock import utc_iso
from fleet.keys import Keys
from fleet.redisconn import REDIS_DOWN
from fleet.retry import OnRetry

SERVICE = "telegram-fetcher"
EventKind = Literal["started", "progress", "completed", "failed"]
Status = Literal["running", "ok", "partial", "error"]

ALWAYS_FIELDS = (
    "event",
    "command_id",
    "chat",
    "mode",
    "params",
    "processed",
    "errors",
    "duration_sec",
    "status",
    "ts",
    "worker_id",
    "service",
)
TERMINAL = frozenset({"completed", "failed"})
_DEFAULT_STATUS: dict[str, Status] = {
    "started": "running",
    "progress": "running",
    "completed": "ok",
    "failed": "error",
}


def make_event(
    kind: EventKind,
    *,
    command_id: str | None,
    chat: str | None,
    mode: str | None,
    params: Mapping[str, Any] | None,
    worker_id: str,
    processed: int = 0,
    errors: int = 0,
    duration_sec: float = 0.0,
    status: Status | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    retryable: bool | None = None,
    files: list[str] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One event as a dict, exactly the CONTRACT §4 fields for its kind."""
    if status is None:
        status = _DEFAULT_STATUS[kind]
    event: dict[str, Any] = {
        "event": kind,
        "command_id": command_id,
        "chat": chat,
        "mode": mode,
        "params": dict(params or {}),
        "processed": int(processed),
        "errors": int(errors),
        "duration_sec": round(float(duration_sec), 3),
        "status": status,
        "ts": utc_iso(now or datetime.now(UTC)),
        "worker_id": worker_id,
        "service": SERVICE,
    }
    if kind == "failed":
        event["error"] = {"type": error_type or "Error", "message": error_message or ""}
        event["retryable"] = bool(retryable)
    if kind == "completed":
        event["files"] = list(files or [])
    return event


def poison_event(letter: Any, worker_id: str) -> dict[str, Any]:
    """The ``failed`` event for a command :func:`fleet.recovery.recover` dead-lettered (it was
    recovered ``COMMAND_MAX_DELIVERIES`` times); whoever ran the recovery publishes it."""
    return make_event(
        "failed",
        command_id=letter.command_id,
        chat=letter.chat,
        mode=None,
        params={},
        worker_id=worker_id,
        error_type="PoisonCommand",
        error_message=f"{letter.reason} (dead letter {letter.id})",
        retryable=False,
    )


class EventPublisher:
    """Publishes events of one worker; never raises, never waits longer than ``max_elapsed_s``."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        *,
        stream_maxlen: int = 10_000,
        max_elapsed_s: float = 30.0,
        initial_wait_s: float = 0.1,
        max_wait_s: float = 5.0,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.on_retry = on_retry  # on_retry("redis_publish", reason, delay_s): metrics hook
        self.client = client
        self.keys = keys
        self.stream_maxlen = stream_maxlen
        self.max_elapsed_s = max_elapsed_s
        self.initial_wait_s = initial_wait_s
        self.max_wait_s = max_wait_s
        self.published = 0
        self.given_up = 0

    async def publish(
        self, event: Mapping[str, Any], *, max_elapsed_s: float | None = None
    ) -> bool:
        """PUBLISH + XADD; ``True`` once done, ``False`` if given up (logged)."""
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        budget = self.max_elapsed_s if max_elapsed_s is None else max_elapsed_s
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(REDIS_DOWN),
                wait=wait_exponential(multiplier=self.initial_wait_s, max=self.max_wait_s)
                + wait_random(0, self.initial_wait_s),
                stop=stop_after_delay(budget),
                before_sleep=self._before_sleep,
                reraise=True,
            ):
                with attempt:
                    await self._send(data)
        except REDIS_DOWN as exc:
            self.given_up += 1
            logger.bind(command_id=event.get("command_id"), chat=event.get("chat")).error(
                "event {} given up after {:g}s: {}: {}",
                event.get("event"),
                budget,
                type(exc).__name__,
                exc,
            )
            return False
        self.published += 1
        return True

    def _before_sleep(self, state: RetryCallState) -> None:
        if self.on_retry is None:
            return
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self.on_retry("redis_publish", type(exc).__name__ if exc else "unknown", delay)

    async def _send(self, data: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.publish(self.keys.events_channel, data)
            pipe.xadd(
                self.keys.events_stream,
                {"event": data},
                maxlen=self.stream_maxlen,
                approximate=True,
            )
            await pipe.execute()


class ProgressThrottle:
    """Sends ``progress`` events at most once per ``interval_s``, in the background, so a slow
    Redis never holds up a page; at most one send is in flight (newer counts replace older)."""

    def __init__(self, publisher: EventPublisher, interval_s: float) -> None:
        self.publisher = publisher
        self.interval_s = interval_s
        self._last = float("-inf")
        self._task: asyncio.Task[bool] | None = None

    def offer(self, event: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last < self.interval_s:
            return
        if self._task is not None and not self._task.done():
            return
        self._last = loop.time()
        self._task = asyncio.create_task(
            self.publisher.publish(event, max_elapsed_s=min(5.0, self.publisher.max_elapsed_s))
        )

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for the send in flight (so the terminal event comes after it)."""
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()


def parse_event(raw: bytes | str) -> dict[str, Any] | None:
    """An event from the channel or the stream, or ``None`` if it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) and "event" in data else None
