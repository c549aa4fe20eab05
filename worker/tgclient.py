"""The Telethon client of one session, gated, and the translation of Telethon's errors.

:class:`GatedClient` is a ``TelegramClient`` whose ``__call__`` is the hook every request passes
through: it takes a token from the :class:`~fleet.gate.RequestGate`, reports the outcome back,
sleeps out FloodWaits up to the cap and retries transient errors, so Telethon's real
``iter_messages`` pagination runs unchanged on top of it. :func:`translate` is the one place
Telethon errors become ``worker.errors`` types:

=============================================================  ===================================
Telethon                                                       worker
=============================================================  ===================================
``FloodWaitError``/``FloodPremiumWaitError`` (N <= cap)        slept out (N + jitter), same request
                                                               retried — pagination goes on
the same with N > ``FLOOD_WAIT_MAX_SECONDS``                   ``RateLimited(retry_after=N)``
RPC 5xx, ``TimedOutError``, timeouts, ``OSError``               retried with backoff, then
                                                               ``TransientError``
``AuthKeyError``, ``UnauthorizedError`` (revoked, deactivated)  ``SessionRevoked``
``ChannelPrivateError``, ``UsernameNotOccupiedError``, other    ``PermanentError``
4xx, unknown chats
=============================================================  ===================================

Telethon's own defaults would hide the signals the governor lives on, so the client is built
with ``flood_sleep_threshold=0`` (every FloodWait reaches the hook), ``request_retries=0`` and
``raise_last_call_error=True`` (we retry ourselves, through :mod:`fleet.retry`), a relay
sender that keeps 5xx errors out of Telethon's ``_call`` (which sleeps 2 s on them even when
it will not retry), and ``wait_time=0`` for ``iter_messages`` (it sleeps 1 s per page when
``limit`` is ``None``). Every request first takes a token from the :class:`RequestGate` and
reports its outcome back to it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger
from telethon import TelegramClient, errors, utils
from telethon.tl import functions

from fleet.clock import Clock, SystemClock
from fleet.gate import NullGate, RequestClass, RequestGate
from fleet.retry import OnRetry, Retrier, RetryPolicy
from worker.errors import (
    PermanentError,
    RateLimited,
    SessionRevoked,
    TelegramError,
    TransientError,
)
from worker.settings import WorkerSettings

OnRateLimit = Callable[[str, str], None]
"""``on_rate_limit(source, reason)``: a FloodWait-class answer from Telegram (metrics hook)."""

PAGE_SIZE = 100
MAX_FLOOD_RETRIES = 5  # consecutive slept-out FloodWaits on one request before giving up
FLOOD_JITTER_S = (0.1, 1.0)

_SERVER_SIDE = (errors.ServerError, errors.TimedOutError)
_FLOOD = (
    errors.FloodWaitError,
    errors.FloodPremiumWaitError,
    errors.SlowModeWaitError,
    errors.FloodTestPhoneWaitError,
)
#: ``rate_limit_hits_total{source="telegram", reason=…}``: a small fixed set of reasons.
_FLOOD_REASONS: dict[type[Exception], str] = {
    errors.FloodWaitError: "flood_wait",
    errors.FloodPremiumWaitError: "flood_premium_wait",
    errors.SlowModeWaitError: "slow_mode_wait",
    errors.FloodTestPhoneWaitError: "flood_test_phone_wait",
}
_HISTORY = (functions.messages.GetHistoryRequest,)
_RESOLVE = (functions.contacts.ResolveUsernameRequest, functions.channels.GetChannelsRequest)


class _TransientRpc(Exception):
    """A 5xx-class RPC error, carried past Telethon's ``_call`` so that it does not sleep 2 s."""

    def __init__(self, error: errors.RPCError) -> None:
        super().__init__(str(error))
        self.error = error


# OSError covers TimeoutError (our wait_for) and ConnectionError (MTProtoSender).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (_TransientRpc, OSError)


def classify(request: Any) -> RequestClass:
    """The gate's request class of a TL request."""
    if isinstance(request, _HISTORY):
        return "history"
    if isinstance(request, _RESOLVE):
        return "resolve"
    return "other"


def _rpc_name(exc: BaseException) -> str:
    return getattr(exc, "message", None) or type(exc).__name__


def translate(exc: BaseException, request_class: RequestClass = "other") -> TelegramError:
    """The ``worker.errors`` form of an error raised by Telethon (or the network under it)."""
    if isinstance(exc, TelegramError):
        return exc
    if isinstance(exc, _TransientRpc):
        return TransientError(f"Telegram server error {_rpc_name(exc.error)} on {request_class}")
    if isinstance(exc, TimeoutError):
        return TransientError(f"{request_class} request timed out")
    if isinstance(exc, OSError):
        return TransientError(f"connection problem on {request_class}: {type(exc).__name__}")
    if isinstance(exc, _FLOOD):
        seconds = float(getattr(exc, "seconds", 0) or 0)
        return RateLimited(
            f"{_rpc_name(exc)} on {request_class}", retry_after=seconds, request_class=request_class
        )
    if isinstance(exc, errors.FloodError):  # 420 without a number (e.g. FROZEN_METHOD_INVALID)
        return RateLimited(f"{_rpc_name(exc)} on {request_class}", 60.0, request_class)
    if isinstance(exc, errors.AuthKeyError | errors.UnauthorizedError):
        return SessionRevoked(
            f"the Telegram session is no longer valid ({_rpc_name(exc)}); log in again with "
            "`python -m worker login --session NAME`"
        )
    if isinstance(exc, errors.ChannelPrivateError):
        return PermanentError("the chat is private or this account was banned from it")
    if isinstance(exc, errors.UsernameNotOccupiedError):
        return PermanentError("no chat has this username")
    if isinstance(exc, errors.UsernameInvalidError):
        return PermanentError("the username is invalid")
    if isinstance(exc, errors.ChannelInvalidError | errors.PeerIdInvalidError):
        return PermanentError("no chat with this id is known to this account")
    if isinstance(exc, errors.ChatForbiddenError | errors.ChannelBannedError):
        return PermanentError("this account may not read the chat")
    if isinstance(exc, _SERVER_SIDE):
        return TransientError(f"Telegram server error {_rpc_name(exc)} on {request_class}")
    if isinstance(exc, errors.RPCError):
        code = exc.code or 0
        if code >= 500 or code < 0:
            return TransientError(f"Telegram error {_rpc_name(exc)} on {request_class}")
        return PermanentError(f"Telegram refused the request: {_rpc_name(exc)}")
    if isinstance(exc, ValueError):
        return PermanentError(f"chat not found: {exc}")
    return TransientError(f"unexpected {type(exc).__name__} on {request_class}")


class _RelaySender:
    """Wraps the client's sender for one request so 5xx errors bypass ``_call``'s 2 s sleep."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def send(self, request: Any, ordered: bool = False) -> Awaitable[Any]:
        return self._relay(self._inner.send(request, ordered=ordered))

    @staticmethod
    async def _relay(future: Awaitable[Any]) -> Any:
        try:
            return await future
        except errors.RPCError as exc:
            if isinstance(exc, _SERVER_SIDE) or (exc.code or 0) >= 500 or (exc.code or 0) < 0:
                raise _TransientRpc(exc) from exc
            raise


class ClientFactory(Protocol):
    """Makes the gated client of one session: Telethon over MTProto by default, or what the
    composition root (:mod:`worker.backend`) injects, e.g. the simulator."""

    def __call__(
        self,
        session_name: str,
        *,
        gate: RequestGate | None = None,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
    ) -> GatedClient: ...


class GatedClient(TelegramClient):
    """A ``TelegramClient`` whose every request passes the gate, the timeout and our retries."""

    def __init__(
        self,
        session: Any,
        api_id: int,
        api_hash: str,
        *,
        settings: WorkerSettings,
        gate: RequestGate | None = None,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            session,
            api_id,
            api_hash,
            flood_sleep_threshold=0,
            request_retries=0,
            raise_last_call_error=True,
            receive_updates=False,
            timeout=int(max(1, settings.telegram_request_timeout_seconds)),
            entity_cache_limit=5000,
        )
        self._tf_gate: RequestGate = gate or NullGate()
        self._tf_clock: Clock = clock or SystemClock()
        self._tf_timeout_s = settings.telegram_request_timeout_seconds
        self._tf_flood_cap_s = settings.flood_wait_max_seconds
        self._tf_rng = rng or random.Random()
        self._tf_retrier = Retrier(
            RetryPolicy.from_settings(settings), clock=self._tf_clock, on_retry=on_retry
        )
        self.flood_sleeps: list[float] = []  # seconds slept on FloodWaits, for tests and stats
        # Set by TelegramSession after construction (so the simulator's subclass needs no
        # extra argument): told about every FloodWait-class answer.
        self.on_rate_limit: OnRateLimit | None = None
        self._tf_flood_until: dict[int, float] = {}  # CONSTRUCTOR_ID → end of its FloodWait

    async def __call__(
        self, request: Any, ordered: bool = False, flood_sleep_threshold: int | None = None
    ) -> Any:
        request_class = classify(request)
        try:
            return await self._tf_retrier.call(
                lambda: self._send_once(request, request_class, ordered),
                retry_on=TRANSIENT_ERRORS,
                target=request_class,
            )
        except TelegramError:
            raise
        except (errors.RPCError, *TRANSIENT_ERRORS) as exc:
            raise translate(exc, request_class) from exc

    async def _send_once(self, request: Any, request_class: RequestClass, ordered: bool) -> Any:
        """One attempt, FloodWaits under the cap slept out in place (the request is re-sent)."""
        gate = self._tf_gate
        floods = 0
        while True:
            await self._honour_known_flood(request, request_class)
            await gate.acquire(request_class)
            try:
                result = await asyncio.wait_for(
                    self._call(_RelaySender(self._sender), request, ordered=ordered),
                    self._tf_timeout_s,
                )
            except _FLOOD as exc:
                seconds = float(exc.seconds or 1)
                if self.on_rate_limit is not None:
                    self.on_rate_limit("telegram", _FLOOD_REASONS.get(type(exc), "flood_wait"))
                await gate.report(request_class, "flood", flood_wait_s=seconds)
                floods += 1
                until = self._tf_clock.monotonic() + seconds
                for r in _unwrapped(request):
                    self._tf_flood_until[r.CONSTRUCTOR_ID] = until
                if seconds > self._tf_flood_cap_s or floods > MAX_FLOOD_RETRIES:
                    raise RateLimited(
                        f"{_rpc_name(exc)} on {request_class}",
                        retry_after=seconds,
                        request_class=request_class,
                    ) from exc
                await self._flood_sleep(seconds, request_class)
                continue
            except TRANSIENT_ERRORS:
                await gate.report(request_class, "transient")
                raise
            except (errors.AuthKeyError, errors.UnauthorizedError):
                await gate.report(request_class, "fatal")
                raise
            except errors.RPCError:
                # Telegram answered (private chat, unknown name): says nothing about rate or health.
                await gate.report(request_class, "ok")
                raise
            await gate.report(request_class, "ok")
            return result

    async def _honour_known_flood(self, request: Any, request_class: RequestClass) -> None:
        """Respect a FloodWait already received for this method before sending it again.

        Telethon keeps its own record (``_flood_waited_requests``) in wall-clock time and would
        refuse locally; ours is on the injected clock, so a FakeClock moves it too. Telethon's
        is dropped so that only ours decides.
        """
        requests = _unwrapped(request)
        for r in requests:
            self._flood_waited_requests.pop(r.CONSTRUCTOR_ID, None)
        until = max(self._tf_flood_until.get(r.CONSTRUCTOR_ID, 0.0) for r in requests)
        remaining = until - self._tf_clock.monotonic()
        if remaining <= 0:
            return
        if remaining > self._tf_flood_cap_s:
            raise RateLimited(
                f"still in a flood wait on {request_class}",
                retry_after=math.ceil(remaining),
                request_class=request_class,
            )
        await self._flood_sleep(remaining, request_class)

    async def _flood_sleep(self, seconds: float, request_class: RequestClass) -> None:
        delay = seconds + self._tf_rng.uniform(*FLOOD_JITTER_S)
        logger.info(
            "flood wait {:.0f}s on {}; sleeping {:.1f}s",
            seconds,
            request_class,
            delay,
            event="flood_wait",
            wait_seconds=round(delay, 3),
            request_class=request_class,
        )
        self.flood_sleeps.append(delay)
        await self._tf_clock.sleep(delay)


def _unwrapped(request: Any) -> list[Any]:
    return list(request) if utils.is_list_like(request) else [request]


# --- the session ------------------------------------------------------------------------------
