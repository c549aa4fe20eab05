"""The Telethon client of one session, gated: every request passes the gate and our retries.

:class:`GatedClient` is a ``TelegramClient`` whose ``__call__`` is the hook every request passes
through: it takes a token from the :class:`~fleet.gate.RequestGate`, reports the outcome back,
sleeps out FloodWaits up to the cap and retries transient errors, so Telethon's real
``iter_messages`` pagination runs unchanged on top of it. What the errors become is
:mod:`worker.rpcerrors`; where the client connects is :mod:`worker.endpoint`.

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
from worker.endpoint import apply_endpoint, uses_ipv6
from worker.errors import RateLimited, TelegramError
from worker.rpcerrors import (
    FLOOD,
    TRANSIENT_ERRORS,
    _TransientRpc,
    is_server_side,
    rpc_reason,
    rpc_string,
    translate,
)
from worker.settings import WorkerSettings

OnRateLimit = Callable[[str, str], None]
"""``on_rate_limit(source, reason)``: a FloodWait-class answer from Telegram (metrics hook)."""

PAGE_SIZE = 100
MAX_FLOOD_RETRIES = 5  # consecutive slept-out FloodWaits on one request before giving up

_HISTORY = (functions.messages.GetHistoryRequest,)
_RESOLVE = (functions.contacts.ResolveUsernameRequest, functions.channels.GetChannelsRequest)


def classify(request: Any) -> RequestClass:
    """The gate's request class of a TL request."""
    if isinstance(request, _HISTORY):
        return "history"
    if isinstance(request, _RESOLVE):
        return "resolve"
    return "other"


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
            if is_server_side(exc):
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
        self._tf_jitter_s = settings.flood_wait_jitter_seconds
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
            except FLOOD as exc:
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
        # N is whole seconds rounded up: the window has a free slot by then. The jitter only
        # keeps accounts that flooded together from re-sending in the same instant.
        delay = seconds + self._tf_rng.uniform(0.0, self._tf_jitter_s)
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


async def connect_and_check(client: Any) -> bool:
    """Connect and say whether the session is logged in (callers bound it with one deadline)."""
    await client.connect()
    return bool(await client.is_user_authorized())


DISCONNECT_TIMEOUT_S = 5.0


async def quiet_disconnect(client: Any) -> None:
    """Disconnect, bounded and silent: closing must never mask the error that made us close."""
    try:
        # Bounded: a hung server must not hold the close either.
        await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
    except Exception as exc:  # closing must never mask the error that made us close
        logger.debug("telegram disconnect failed: {}", type(exc).__name__)
