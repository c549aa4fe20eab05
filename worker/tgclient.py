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

Every translated error names the RPC string Telegram sent (``USERNAME_NOT_OCCUPIED: …``, kept as
``rpc_error``): Telethon's known error classes carry only their base class's generic text in
``.message`` (``BAD_REQUEST``, ``FLOOD``), so :func:`rpc_string` recovers the name from the
tables Telethon built the classes from, and :func:`rpc_reason` drops the number for metrics
labels (``FLOOD_WAIT_31`` → ``FLOOD_WAIT``).

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
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger
from telethon import TelegramClient, errors, utils
from telethon.crypto import rsa
from telethon.errors import rpcerrorlist
from telethon.tl import functions

from fleet.clock import Clock, SystemClock
from fleet.gate import NullGate, RequestClass, RequestGate
from fleet.retry import OnRetry, Retrier, RetryPolicy
from fleet.settings import ConfigError
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


# Telethon's known error classes keep only their base class's generic text in ``.message``
# (``USERNAME_NOT_OCCUPIED`` says ``BAD_REQUEST``, ``FLOOD_WAIT_31`` says ``FLOOD``): the RPC
# string is recovered from the tables Telethon built the class from.
_NAME_OF: dict[type[BaseException], str] = {}
for _name, _cls in rpcerrorlist.rpc_errors_dict.items():
    _NAME_OF.setdefault(_cls, _name)
_PATTERN_OF: dict[type[BaseException], str] = {
    _cls: _pattern for _pattern, _cls in rpcerrorlist.rpc_errors_re
}
_CAPTURE = re.compile(r"\(\\d\+\)")


def _capture(exc: BaseException) -> int | None:
    """The number a pattern error (``FLOOD_WAIT_31``) was made with; Telethon names its
    attribute per class (``seconds``, ``new_dc``, ``which``…), so take the one int it set."""
    for key, value in vars(exc).items():
        if key != "code" and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def rpc_string(exc: BaseException) -> str:
    """The RPC error as Telegram sent it (``FLOOD_WAIT_31``, ``USERNAME_NOT_OCCUPIED``)."""
    name = _NAME_OF.get(type(exc))
    if name is not None:
        return name
    pattern = _PATTERN_OF.get(type(exc))
    if pattern is not None:
        number = _capture(exc)
        return _CAPTURE.sub(str(number) if number is not None else "N", pattern)
    return getattr(exc, "message", None) or type(exc).__name__


def rpc_reason(exc: BaseException) -> str:
    """The RPC error without its number (``FLOOD_WAIT``): a bounded metrics label."""
    pattern = _PATTERN_OF.get(type(exc))
    if pattern is not None:
        return _CAPTURE.sub("", pattern).replace("__", "_").strip("_")
    return re.sub(r"_?\d+$", "", rpc_string(exc)) or rpc_string(exc)


def translate(exc: BaseException, request_class: RequestClass = "other") -> TelegramError:
    """The ``worker.errors`` form of an error raised by Telethon (or the network under it).

    Every message starts with the RPC string Telegram sent (``USERNAME_NOT_OCCUPIED: …``) and
    the error keeps it as ``rpc_error``, so logs, events and metrics name the real error.
    """
    if isinstance(exc, TelegramError):
        return exc
    if isinstance(exc, _TransientRpc):
        exc = exc.error
    if isinstance(exc, TimeoutError):
        return TransientError(f"{request_class} request timed out", rpc_error="TIMEOUT")
    if isinstance(exc, EOFError):  # asyncio.IncompleteReadError: closed mid-answer
        return TransientError(
            f"the server closed the connection on {request_class}", rpc_error="CONNECTION_CLOSED"
        )
    if isinstance(exc, OSError):
        return TransientError(
            f"connection problem on {request_class}: {type(exc).__name__}",
            rpc_error=type(exc).__name__,
        )
    if not isinstance(exc, errors.RPCError):
        if isinstance(exc, ValueError):
            return PermanentError(f"chat not found: {exc}")
        return TransientError(f"unexpected {type(exc).__name__} on {request_class}")
    name = rpc_string(exc)

    def said(text: str) -> str:
        return f"{name}: {text}"

    if isinstance(exc, _FLOOD):
        seconds = float(getattr(exc, "seconds", 0) or 0)
        return RateLimited(
            said(f"Telegram asks to wait {seconds:.0f}s before the next {request_class} request"),
            retry_after=seconds,
            request_class=request_class,
            rpc_error=name,
        )
    if isinstance(exc, errors.FloodError):  # 420 without a number (e.g. FROZEN_METHOD_INVALID)
        return RateLimited(said(f"rate limited on {request_class}"), 60.0, request_class, name)
    if isinstance(exc, errors.AuthKeyError | errors.UnauthorizedError):
        return SessionRevoked(
            said(
                "the Telegram session is no longer valid; log in again with "
                "`python -m worker login --session NAME`"
            ),
            rpc_error=name,
        )
    permanent = {
        errors.ChannelPrivateError: "the chat is private or this account was banned from it",
        errors.UsernameNotOccupiedError: "no chat has this username",
        errors.UsernameInvalidError: "the username is invalid",
        errors.ChannelInvalidError: "no chat with this id is known to this account",
        errors.PeerIdInvalidError: "no chat with this id is known to this account",
        errors.ChatForbiddenError: "this account may not read the chat",
        errors.ChannelBannedError: "this account may not read the chat",
        errors.PhoneNumberUnoccupiedError: "no Telegram account uses this phone number",
        errors.PhoneNumberInvalidError: "not a valid phone number",
        errors.PhoneNumberBannedError: "this phone number is banned from Telegram",
        errors.PhoneCodeInvalidError: "the login code was wrong",
        errors.PhoneCodeExpiredError: "the login code expired; ask for a new one",
        errors.PasswordHashInvalidError: "the two-step verification password was wrong",
    }
    for cls, text in permanent.items():
        if isinstance(exc, cls):
            return PermanentError(said(text), rpc_error=name)
    code = exc.code or 0
    if isinstance(exc, _SERVER_SIDE) or code >= 500 or code < 0:
        return TransientError(said(f"Telegram server error on {request_class}"), rpc_error=name)
    return PermanentError(said("Telegram refused the request"), rpc_error=name)


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
            # Telethon's own reconnect loop retries 5 times by default (and forever with None);
            # our requests are bounded by wait_for, and a lost connection is retried by us.
            connection_retries=2,
            retry_delay=1,
            use_ipv6=uses_ipv6(settings),
        )
        apply_endpoint(self, settings)
        self._tf_gate: RequestGate = gate or NullGate()
        self._tf_clock: Clock = clock or SystemClock()
        self._tf_timeout_s = settings.telegram_request_timeout_seconds
        self._tf_flood_cap_s = settings.flood_wait_max_seconds
        self._tf_rng = rng or random.Random()
        # The retrier names a retry by the exception's class; a relayed 5xx would show as
        # ``_TransientRpc``, so the hook is told the RPC reason (``INTERNAL``) instead.
        self._tf_last_reason = "unknown"
        self._tf_on_retry = on_retry
        self._tf_retrier = Retrier(
            RetryPolicy.from_settings(settings),
            clock=self._tf_clock,
            on_retry=self._named_retry if on_retry is not None else None,
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

    def _named_retry(self, target: str, reason: str, delay_s: float) -> None:
        if self._tf_on_retry is not None:
            self._tf_on_retry(target, self._tf_last_reason, delay_s)

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
                    self.on_rate_limit("telegram", rpc_reason(exc))
                await gate.report(request_class, "flood", flood_wait_s=seconds)
                floods += 1
                until = self._tf_clock.monotonic() + seconds
                for r in _unwrapped(request):
                    self._tf_flood_until[r.CONSTRUCTOR_ID] = until
                if seconds > self._tf_flood_cap_s or floods > MAX_FLOOD_RETRIES:
                    raise RateLimited(
                        f"{rpc_string(exc)}: Telegram asks to wait {seconds:.0f}s before the "
                        f"next {request_class} request",
                        retry_after=seconds,
                        request_class=request_class,
                        rpc_error=rpc_string(exc),
                    ) from exc
                await self._flood_sleep(seconds, request_class)
                continue
            except TRANSIENT_ERRORS as exc:
                self._tf_last_reason = (
                    rpc_reason(exc.error) if isinstance(exc, _TransientRpc) else type(exc).__name__
                )
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


def uses_ipv6(settings: WorkerSettings) -> bool:
    """Whether the configured endpoint is an IPv6 address (Telethon must be told, or its
    ``connect`` replaces the address with its default DC)."""
    endpoint = settings.telegram_endpoint()
    return endpoint is not None and ":" in endpoint[1]


def apply_endpoint(client: TelegramClient, settings: WorkerSettings) -> None:
    """Point a client's session at ``TELEGRAM_DC`` / ``TELEGRAM_TEST_SERVERS`` (before
    ``connect``), and teach Telethon the endpoint's public key if a file names one."""
    key_file = settings.telegram_dc_public_key_file
    if key_file is not None:
        try:
            rsa.add_key(key_file.read_text(encoding="ascii"), old=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"TELEGRAM_DC_PUBLIC_KEY_FILE: {key_file} is not a PEM RSA public key "
                f"({type(exc).__name__})"
            ) from exc
    endpoint = settings.telegram_endpoint()
    if endpoint is None:
        return
    dc_id, host, port = endpoint
    session = client.session
    if session.auth_key is not None and session.dc_id not in (0, dc_id):
        # Logged in, and Telegram moved the account to its home DC (an address the endpoint
        # itself gave during login): the key belongs there, so that is where to connect.
        logger.info("session is on DC {} of the configured endpoint; keeping it", session.dc_id)
        return
    if (session.dc_id, session.server_address, session.port) != (dc_id, host, port):
        session.set_dc(dc_id, host, port)
        session.save()


def _unwrapped(request: Any) -> list[Any]:
    return list(request) if utils.is_list_like(request) else [request]


# --- the session ------------------------------------------------------------------------------
