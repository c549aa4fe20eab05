"""The Telegram boundary: one session's connection — resolve chats, page through history.

:class:`TelegramSession` owns the session's :class:`~worker.tgclient.GatedClient` (the real
Telethon client, gated and with Telethon's own flood sleeping and retries off; see
:mod:`worker.rpcerrors` for how every Telethon error is translated), resolves chats with a cache,
and pages through a day's history oldest to newest, 100 messages per request, resuming after a
message id. Resolving is :mod:`worker.resolver`, the check that an answer is still the chat
the name named is :mod:`worker.rightchat`, and ``login`` is :mod:`worker.login`. Nothing
Telethon-specific leaves these modules and :mod:`worker.tgclient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from telethon import errors
from telethon.sessions import SQLiteSession
from telethon.tl import functions, types

from fleet.chats import ChatId
from fleet.clock import Clock, SystemClock
from fleet.gate import NullGate, RequestGate
from fleet.retry import OnRetry
from worker.errors import SessionRevoked, TelegramError, TransientError
from worker.mapping import message_to_dict
from worker.resolver import ChatResolver, ResolvedChat
from worker.rightchat import chat_in, confirm
from worker.rpcerrors import translate
from worker.session_file import credentials, protect, session_path
from worker.settings import WorkerSettings
from worker.tgclient import (
    PAGE_SIZE,
    ClientFactory,
    GatedClient,
    connect_and_check,
    quiet_disconnect,
)

__all__ = ["FetchedMessage", "Landmark", "ResolvedChat", "TelegramSession"]

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    id: int
    date: datetime
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Landmark:
    """The one message a ``limit=1`` history request named (for completeness proofs)."""

    id: int
    date: datetime


class TelegramSession:
    """One Telegram account's connection: resolve chats, page through their history."""

    def __init__(
        self,
        settings: WorkerSettings,
        session_name: str,
        *,
        gate: RequestGate | None = None,
        clock: Clock | None = None,
        on_retry: OnRetry | None = None,
        metrics: WorkerMetrics | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.settings = settings
        self.session_name = session_name
        self.client_factory = client_factory
        self.gate: RequestGate = gate or NullGate()
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        if on_retry is None and metrics is not None:
            on_retry = self._record_retry
        self.on_retry = on_retry
        self._client: GatedClient | None = None
        self._chats = ChatResolver()
        self._path: Path | None = None

    @property
    def connected(self) -> bool:
        """Connected and logged in (read by ``/health/details`` from another thread)."""
        client = self._client
        return client is not None and bool(client.is_connected())

    def _record_retry(self, target: str, reason: str, delay_s: float) -> None:
        # target is the request class: retries_total{target="telegram_history", …}
        assert self.metrics is not None
        self.metrics.record_retry(f"telegram_{target}", reason, delay_s)
        logger.debug(
            "telegram {} request failed ({}); retry in {:.2f}s",
            target,
            reason,
            delay_s,
            event="retry",
            error_type=reason,
            wait_seconds=round(delay_s, 3),
        )

    def _count_rate_limit(self, source: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rate_limit_hits_total.labels(source=source, reason=reason).inc()

    @property
    def client(self) -> GatedClient:
        """The connected client (tests and the simulator's benchmarks read its counters)."""
        if self._client is None:
            raise TransientError("the Telegram session is not connected")
        return self._client

    def _make_client(self) -> GatedClient:
        client = self._new_client()
        client.on_rate_limit = self._count_rate_limit
        return client

    def _new_client(self) -> GatedClient:
        if self.client_factory is not None:
            return self.client_factory(
                self.session_name, gate=self.gate, clock=self.clock, on_retry=self.on_retry
            )
        api_id, api_hash = credentials(self.settings)
        path = session_path(self.settings, self.session_name)
        if not path.exists():
            raise SessionRevoked(
                f"session {self.session_name!r} is not logged in (no {path}); run "
                f"`python -m worker login --session {self.session_name}`"
            )
        self._path = path
        client = GatedClient(
            SQLiteSession(str(path)),
            api_id,
            api_hash,
            settings=self.settings,
            gate=self.gate,
            clock=self.clock,
            on_retry=self.on_retry,
        )
        protect(path)
        return client

    async def connect(self) -> None:
        """Connect and check the session is logged in (``SessionRevoked`` if not)."""
        if self._client is not None and self._client.is_connected():
            return
        started = time.perf_counter()
        logger.debug(
            "connecting to telegram: session {}, backend {}",
            self.session_name,
            self.settings.telegram_backend,
            event="telegram_connect",
        )
        client = self._make_client()
        bound = self.settings.connect_timeout_s
        try:
            # One deadline for connect + the authorisation check: Telethon's connect has none
            # of its own while it waits for the handshake (a server that accepts and never
            # answers would hold it forever), and its retries would multiply any per-step one.
            authorized = await asyncio.wait_for(connect_and_check(client), bound)
        except TelegramError:
            await quiet_disconnect(client)
            raise
        except TimeoutError as exc:
            await quiet_disconnect(client)
            raise TransientError(
                f"TIMEOUT: no answer from Telegram within {bound:g}s while connecting "
                f"(session {self.session_name})",
                rpc_error="TIMEOUT",
            ) from exc
        except (errors.RPCError, OSError, EOFError) as exc:
            # EOFError: asyncio's IncompleteReadError, the server closing mid-handshake.
            await quiet_disconnect(client)
            raise translate(exc) from exc
        if not authorized:
            await quiet_disconnect(client)
            raise SessionRevoked(
                f"session {self.session_name!r} is not authorized; run "
                f"`python -m worker login --session {self.session_name}`"
            )
        self._client = client
        if self._path is not None:
            protect(self._path)
        logger.info(
            "telegram session {} connected ({})",
            self.session_name,
            self.settings.telegram_backend,
            event="telegram_connected",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def close(self) -> None:
        """Disconnect; safe to call twice or without ``connect``."""
        client, self._client = self._client, None
        await self.gate.aclose()
        if client is not None:
            await quiet_disconnect(client)
            if self._path is not None:
                protect(self._path)

    async def __aenter__(self) -> TelegramSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- resolving --------------------------------------------------------------------------

    async def resolve(self, chat: ChatId) -> ResolvedChat:
        """Find the chat; cached per session (Telegram limits resolving far more than reading)."""
        hit = self._chats.cached(chat)
        if hit is not None:
            return hit
        return await self._chats.resolve(self.client, chat)

    async def confirm(self, chat: ResolvedChat, entity: Any) -> None:
        """Check a history answer's chat against a name resolved from a cache
        (:func:`worker.rightchat.confirm`): ``ChatMoved`` if the name moved."""
        await confirm(self._chats, self.client, chat, entity)

    # --- history ----------------------------------------------------------------------------

    async def newest_before(
        self, chat: ResolvedChat, *, before: datetime | None = None, before_id: int = 0
    ) -> Landmark | None:
        """The newest message older than ``before_id`` (or, without it, dated before
        ``before``): one ``messages.getHistory`` with ``limit=1``. ``None``: none at all.

        A server may ignore ``offset_date``; the caller checks the answer's date.
        """
        client = self.client
        request = functions.messages.GetHistoryRequest(
            peer=chat.input_peer,
            offset_id=before_id,
            offset_date=None if before_id else before,
            add_offset=0,
            limit=1,
            max_id=0,
            min_id=0,
            hash=0,
        )
        try:
            result = await client(request)
        except TelegramError:
            raise
        except (errors.RPCError, OSError, ValueError) as exc:
            raise translate(exc, "history") from exc
        if chat.cached:
            await self.confirm(chat, chat_in(result, chat.peer_id))
        return _landmark(list(getattr(result, "messages", [])))

    async def iter_history(
        self, chat: ResolvedChat, start: datetime, end: datetime, after_id: int = 0
    ) -> AsyncIterator[list[FetchedMessage]]:
        """Messages with ``start <= date < end`` and ``id > after_id``, oldest first, in pages
        of at most 100 (a page is the unit to checkpoint after)."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        client = self.client
        kwargs: dict[str, Any] = {"reverse": True, "wait_time": 0, "limit": None}
        if after_id > 0:
            kwargs["min_id"] = after_id
        else:
            kwargs["offset_date"] = start
        display = chat.chat.display
        page: list[FetchedMessage] = []
        messages = client.iter_messages(chat.input_peer, **kwargs)
        checked = not chat.cached
        try:
            async for msg in messages:
                if isinstance(msg, types.MessageEmpty):
                    continue
                if not checked:  # the first answer says whose history this is
                    await self.confirm(chat, msg.chat)
                    checked = True
                date = msg.date
                if date >= end:
                    break
                # Telegram pads a short first page with older messages (add_offset is clamped).
                if date < start or msg.id <= after_id:
                    continue
                page.append(FetchedMessage(msg.id, date, message_to_dict(msg, display)))
                if len(page) >= PAGE_SIZE:
                    yield page
                    page = []
        except TelegramError:
            raise
        except (errors.RPCError, OSError, ValueError) as exc:
            raise translate(exc, "history") from exc
        if page:
            yield page


def _landmark(messages: list[Any]) -> Landmark | None:
    real = [m for m in messages if not isinstance(m, types.MessageEmpty) and m.date is not None]
    if not real:
        return None
    newest = max(real, key=lambda m: m.id)
    return Landmark(newest.id, newest.date)
