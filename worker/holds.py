"""Fleet holds pushed to a worker: wake requests sleeping on a slot booked before a FloodWait.

A FloodWait in any session sets a fleet hold on its request class (``flood.lua``): Telegram just
found the window full, so every session's next request would flood too. ``bucket.lua`` refuses
new bookings while the hold lasts, but a worker that booked its slot a moment *before* the flood
is already asleep until that slot and would send into the full window. ``flood.lua`` therefore
PUBLISHes each new hold (``<cls> <ms>`` on ``Keys.holds_channel``); :class:`HoldListener` keeps
one subscription per gate and wakes the sleepers of that class, which give up the stale slot
and ask the bucket again (it answers "held" until the hold ends).

Pushed, not polled: the hot path stays one Redis call per request. If the subscription is down
(Redis unavailable), sleepers are simply not woken early; the bucket still refuses new bookings
during a hold, so the cost is at most the slots already booked, as without the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.clock import Clock
from fleet.redisconn import REDIS_DOWN
from fleet.scripts import text

#: How long closing the subscription may take before it is abandoned.
CLOSE_TIMEOUT_S = 1.0
#: The longest single read of the subscription (a cancel is honoured at least this often).
READ_TIMEOUT_S = 1.0


class HoldListener:
    def __init__(self, redis: Redis, channel: str, *, retry_s: float = 0.5) -> None:
        self.redis = redis
        self.channel = channel
        self.retry_s = retry_s
        self.holds_seen = 0
        self.woken = 0
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._waiters: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        """Subscribe in the background (idempotent; needs a running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_subscribed(self, within_s: float) -> bool:
        """True once the subscription is live (tests and start-up checks)."""
        try:
            async with asyncio.timeout(within_s):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._subscribed.clear()

    async def sleep(self, clock: Clock, request_class: str, seconds: float) -> bool:
        """Sleep ``seconds`` on ``clock`` unless a hold on ``request_class`` is announced first.

        Returns True if a hold cut the sleep short (the booked slot must not be used).
        """
        if self._task is None or not self._subscribed.is_set():
            await clock.sleep(seconds)
            return False
        notice = self._waiters.get(request_class)
        if notice is None or notice.is_set():
            notice = self._waiters[request_class] = asyncio.Event()
        sleeper = asyncio.ensure_future(clock.sleep(seconds))
        woken = asyncio.ensure_future(notice.wait())
        try:
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
            interrupted = not sleeper.done()
        finally:
            for task in (sleeper, woken):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(sleeper, woken, return_exceptions=True)
        if interrupted:
            self.woken += 1
        return interrupted

    def _announce(self, data: Any) -> None:
        request_class = text(data).split(" ", 1)[0]
        self.holds_seen += 1
        notice = self._waiters.pop(request_class, None)
        if notice is not None:
            notice.set()

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                while True:
                    # A bounded read, not ``listen()``: redis-py's blocking read of a pubsub
                    # could keep a cancelled listener waiting (the task "cancelling" on its
                    # socket), which hung a gate's close and an event loop's shutdown.
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=READ_TIMEOUT_S
                    )
                    if message is not None and message.get("type") == "message":
                        self._announce(message.get("data", b""))
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise asyncio.CancelledError
            except REDIS_DOWN as exc:
                logger.debug("fleet hold subscription down ({}); retrying", type(exc).__name__)
            except Exception as exc:  # never let the listener die: holds would stop arriving
                logger.warning("fleet hold subscription failed ({}); retrying", exc)
            finally:
                self._subscribed.clear()
                # Bounded: this also runs when the task is cancelled (close, or a loop shutting
                # down), and an unbounded close of a pubsub whose connection is being re-made
                # to a restarted Redis hung a test's event-loop teardown for its whole timeout.
                await _close_within(pubsub, CLOSE_TIMEOUT_S)
            await asyncio.sleep(self.retry_s)


async def _close_within(pubsub: Any, seconds: float) -> None:
    """Close ``pubsub``, giving up after ``seconds``, and never wait for the close to end after
    that: ``asyncio.wait_for`` waits for the task it cancels to finish, and a close stuck in the
    connection pool's teardown (a client closed under it) kept a test's event-loop shutdown
    waiting with no timer for its whole timeout, on a clean-clone CI run."""
    closing = asyncio.ensure_future(pubsub.aclose())
    closing.add_done_callback(_consume)
    try:
        await asyncio.wait((closing,), timeout=seconds)
    finally:
        if not closing.done():
            closing.cancel()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed close is not "never retrieved"
