"""The Telegram boundary: one session's connection — resolve chats, page through history.

:class:`TelegramSession` owns the session's :class:`~worker.tgclient.GatedClient` (the real
Telethon client, gated and with Telethon's own flood sleeping and retries off; see
:mod:`worker.tgclient` for how every Telethon error is translated), resolves chats with a cache,
and pages through a day's history oldest to newest, 100 messages per request, resuming after a
message id. ``login`` creates a session interactively. Nothing Telethon-specific leaves this
module and :mod:`worker.tgclient`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from telethon import TelegramClient, errors, utils
from telethon.sessions import SQLiteSession
from telethon.tl import functions, types

from fleet.chats import ChatId
from fleet.clock import Clock, SystemClock
from fleet.gate import NullGate, RequestGate
from fleet.retry import OnRetry
from fleet.settings import ConfigError
from worker.errors import (
    ChatMoved,
    PermanentError,
    SessionRevoked,
    TelegramError,
    TransientError,
)
from worker.mapping import message_to_dict
from worker.settings import WorkerSettings
from worker.tgclient import (
    PAGE_SIZE,
    ClientFactory,
    GatedClient,
    apply_endpoint,
    translate,
    uses_ipv6,
)

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

OnRateLimit = Callable[[str, str], None]
"""``on_rate_limit(source, reason)``: a FloodWait-class answer from Telegram (metrics hook)."""


@dataclass(frozen=True, slots=True)
class ResolvedChat:
    """A chat this session can read: what the command named plus Telegram's identity for it."""

    chat: ChatId
    peer_id: int  # marked id: -100… for channels/supergroups, -… for basic groups
    title: str
    username: str | None
    input_peer: Any = field(repr=False, compare=False)  # opaque; only this module reads it
    #: Taken from a cache (the session file's entities): trusted only once a history answer
    #: shows the chat still has this username (usernames are released and reclaimed).
    cached: bool = field(default=False, compare=False)


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


def _credentials(settings: WorkerSettings) -> tuple[int, str]:
    api_hash = settings.telegram_api_hash.get_secret_value() if settings.telegram_api_hash else ""
    if not settings.telegram_api_id or not api_hash:
        raise ConfigError(
            "TELEGRAM_API_ID and TELEGRAM_API_HASH are required with TELEGRAM_BACKEND=telethon "
            "(create them at https://my.telegram.org), or set TELEGRAM_BACKEND=sim"
        )
    return settings.telegram_api_id, api_hash


def session_path(settings: WorkerSettings, session_name: str) -> Path:
    """``SESSIONS_DIR/<name>.session``; creates ``SESSIONS_DIR`` with mode 0700."""
    directory = settings.sessions_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory / f"{session_name}.session"


def _protect(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + "-journal")):
        if candidate.exists():
            os.chmod(candidate, 0o600)


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
        self._resolved: dict[str | int, ResolvedChat] = {}
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
        api_id, api_hash = _credentials(self.settings)
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
        _protect(path)
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
            authorized = await asyncio.wait_for(_connect_and_check(client), bound)
        except TelegramError:
            await _quiet_disconnect(client)
            raise
        except TimeoutError as exc:
            await _quiet_disconnect(client)
            raise TransientError(
                f"TIMEOUT: no answer from Telegram within {bound:g}s while connecting "
                f"(session {self.session_name})",
                rpc_error="TIMEOUT",
            ) from exc
        except (errors.RPCError, OSError, EOFError) as exc:
            # EOFError: asyncio's IncompleteReadError, the server closing mid-handshake.
            await _quiet_disconnect(client)
            raise translate(exc) from exc
        if not authorized:
            await _quiet_disconnect(client)
            raise SessionRevoked(
                f"session {self.session_name!r} is not authorized; run "
                f"`python -m worker login --session {self.session_name}`"
            )
        self._client = client
        if self._path is not None:
            _protect(self._path)
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
            await _quiet_disconnect(client)
            if self._path is not None:
                _protect(self._path)

    async def __aenter__(self) -> TelegramSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- resolving --------------------------------------------------------------------------

    async def resolve(self, chat: ChatId) -> ResolvedChat:
        """Find the chat; cached per session (Telegram limits resolving far more than reading)."""
        key: str | int = chat.lookup.lower() if isinstance(chat.lookup, str) else chat.lookup
        cached = self._resolved.get(key)
        if cached is not None:
            # A name resolved earlier may have moved since: checked on the next answer.
            return replace(cached, cached=isinstance(chat.lookup, str))
        client = self.client
        try:
            if isinstance(chat.lookup, str):
                resolved = await self._resolve_username(client, chat)
            else:
                resolved = await self._resolve_id(client, chat)
        except TelegramError:
            raise
        except (errors.RPCError, OSError, ValueError, TypeError) as exc:
            raise translate(exc, "resolve") from exc
        self._resolved[key] = resolved
        return resolved

    async def _resolve_username(
        self, client: GatedClient, chat: ChatId, *, network: bool = False
    ) -> ResolvedChat:
        username = str(chat.lookup)
        peer = None
        if not network:
            try:  # the session's own entity cache (persisted by SQLiteSession): no request
                peer = client.session.get_input_entity(username)
            except (ValueError, TypeError):
                peer = None
        if isinstance(peer, types.InputPeerChannel | types.InputPeerChat):
            return ResolvedChat(
                chat, utils.get_peer_id(peer), chat.display, username, peer, cached=True
            )
        try:
            result = await client(functions.contacts.ResolveUsernameRequest(username=username))
        except PermanentError as exc:
            raise PermanentError(f"{chat.display}: {exc}", rpc_error=exc.rpc_error) from exc
        entity = _entity_for(result.peer, result.chats, result.users)
        return self._from_entity(chat, entity)

    async def _resolve_id(self, client: GatedClient, chat: ChatId) -> ResolvedChat:
        number = int(chat.lookup)
        bare, peer_type = utils.resolve_id(number)
        if number > 0:  # a bare positive id: only channels/supergroups are read by id
            peer_type = types.PeerChannel
        peer = peer_type(bare)
        try:
            cached = client.session.get_input_entity(peer)
        except (ValueError, TypeError):
            cached = None
        if isinstance(cached, types.InputPeerChannel | types.InputPeerChat):
            return ResolvedChat(chat, utils.get_peer_id(cached), chat.display, None, cached)
        if peer_type is not types.PeerChannel:
            raise PermanentError(
                f"{chat.display}: basic group or user ids are not supported unless the session "
                "already knows them; use the chat's @username or its -100… supergroup id"
            )
        try:
            result = await client(
                functions.channels.GetChannelsRequest(id=[types.InputChannel(bare, 0)])
            )
        except PermanentError as exc:
            raise PermanentError(
                f"{chat.display}: unknown to this account ({exc}); use the @username once so "
                "the session learns the chat, or check the id",
                rpc_error=exc.rpc_error,
            ) from exc
        if not result.chats:
            raise PermanentError(f"{chat.display}: no such chat")
        return self._from_entity(chat, result.chats[0])

    @staticmethod
    def _from_entity(chat: ChatId, entity: Any) -> ResolvedChat:
        if isinstance(entity, types.ChannelForbidden | types.ChatForbidden):
            raise PermanentError(f"{chat.display}: this account is banned from the chat")
        if isinstance(entity, types.User):
            raise PermanentError(f"{chat.display} is a user, not a group or channel")
        if not isinstance(entity, types.Channel | types.Chat):
            raise PermanentError(f"{chat.display}: unsupported chat type {type(entity).__name__}")
        return ResolvedChat(
            chat=chat,
            peer_id=utils.get_peer_id(entity),
            title=entity.title,
            username=getattr(entity, "username", None),
            input_peer=utils.get_input_peer(entity),
        )

    # --- identity -------------------------------------------------------------------------

    async def confirm(self, chat: ResolvedChat, entity: Any) -> None:
        """Check a history answer's chat against what was resolved from a cache.

        The answer's chat must be the resolved one and still carry the username the command
        named. If not, the username moved: the cache entry is dropped, the name re-resolved
        over the network, and ``ChatMoved`` raised before anything is written.
        """
        if not chat.cached or entity is None or not isinstance(chat.chat.lookup, str):
            return
        wanted = str(chat.chat.lookup).lower()
        names = _usernames(entity)
        if utils.get_peer_id(entity) == chat.peer_id and wanted in names:
            return
        key = wanted
        self._resolved.pop(key, None)
        try:
            fresh = await self._resolve_username(self.client, chat.chat, network=True)
        except PermanentError as exc:
            fresh_text = f"it names no chat now ({exc})"
        else:
            self._resolved[key] = fresh
            fresh_text = f"it now names chat {fresh.peer_id}"
        now = ", ".join(f"@{n}" for n in sorted(names)) or "no username"
        logger.warning(
            "{}: cached chat {} has {} now; {}",
            chat.chat.display,
            chat.peer_id,
            now,
            fresh_text,
            event="chat_moved",
        )
        raise ChatMoved(
            f"USERNAME_MOVED: {chat.chat.display} was cached as chat {chat.peer_id}, which has "
            f"{now} now; {fresh_text}. Nothing was written under the old chat; a retry fetches "
            "the chat the name names now",
            rpc_error="USERNAME_MOVED",
        )

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
            await self.confirm(chat, _chat_in(result, chat.peer_id))
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


def _usernames(entity: Any) -> set[str]:
    """Every username a chat has now (its main one and any collectible ones), lower-cased."""
    names = {str(entity.username).lower()} if getattr(entity, "username", None) else set()
    for extra in getattr(entity, "usernames", None) or []:
        if getattr(extra, "active", True) and getattr(extra, "username", None):
            names.add(str(extra.username).lower())
    return names


def _chat_in(result: Any, peer_id: int) -> Any:
    """The answer's chat: the one with the asked peer id (or, failing that, the first)."""
    chats = list(getattr(result, "chats", []) or [])
    for entity in chats:
        if utils.get_peer_id(entity) == peer_id:
            return entity
    return chats[0] if chats else None


def _landmark(messages: list[Any]) -> Landmark | None:
    real = [m for m in messages if not isinstance(m, types.MessageEmpty) and m.date is not None]
    if not real:
        return None
    newest = max(real, key=lambda m: m.id)
    return Landmark(newest.id, newest.date)


def _entity_for(peer: Any, chats: list[Any], users: list[Any]) -> Any:
    wanted = utils.get_peer_id(peer)
    for entity in (*chats, *users):
        if utils.get_peer_id(entity) == wanted:
            return entity
    raise PermanentError("Telegram resolved the name to nothing usable")


async def _connect_and_check(client: Any) -> bool:
    await client.connect()
    return bool(await client.is_user_authorized())


DISCONNECT_TIMEOUT_S = 5.0


async def _quiet_disconnect(client: Any) -> None:
    try:
        # Bounded: a hung server must not hold the close either.
        await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
    except Exception as exc:  # closing must never mask the error that made us close
        logger.debug("telegram disconnect failed: {}", type(exc).__name__)


# --- login (python -m worker login --session NAME) --------------------------------------------


async def login(
    settings: WorkerSettings,
    session_name: str,
    *,
    ask: Callable[[str], str],
    ask_secret: Callable[[str], str],
) -> str:
    """Log a session in interactively; returns the account's display name.

    ``ask`` prompts for plain values (the phone, unless ``TELEGRAM_PHONE`` is set),
    ``ask_secret`` for the login code and the 2FA password; none of them is logged or echoed.
    """
    api_id, api_hash = _credentials(settings)
    path = session_path(settings, session_name)
    client = TelegramClient(
        SQLiteSession(str(path)),
        api_id,
        api_hash,
        flood_sleep_threshold=0,
        receive_updates=False,
        timeout=int(max(1, settings.telegram_request_timeout_seconds)),
        connection_retries=2,
        use_ipv6=uses_ipv6(settings),
    )
    apply_endpoint(client, settings)
    _protect(path)
    bound = settings.connect_timeout_s
    try:
        try:
            authorized = await asyncio.wait_for(_connect_and_check(client), bound)
        except TimeoutError as exc:
            raise TransientError(
                f"TIMEOUT: no answer from Telegram within {bound:g}s while connecting",
                rpc_error="TIMEOUT",
            ) from exc
        if not authorized:
            await _sign_in(client, settings, ask=ask, ask_secret=ask_secret)
        me = await client.get_me()
    except TelegramError:
        raise
    except errors.PhoneNumberInvalidError as exc:
        raise ConfigError("TELEGRAM_PHONE: PHONE_NUMBER_INVALID: not a valid phone number") from exc
    except (errors.RPCError, OSError, EOFError) as exc:
        # translate() names each sign-in refusal (PHONE_NUMBER_UNOCCUPIED: no Telegram account
        # uses this phone number; PHONE_CODE_EXPIRED; PASSWORD_HASH_INVALID …).
        raise login_error(exc) from exc
    finally:
        await _quiet_disconnect(client)
        _protect(path)
    if me is None:
        raise SessionRevoked("login did not complete")
    name = " ".join(p for p in (me.first_name, me.last_name) if p) or "(no name)"
    return f"{name} (@{me.username})" if me.username else name


def login_error(exc: BaseException) -> TelegramError:
    """What a failed login tells the user: the RPC name and what to do about it."""
    error = translate(exc)
    if isinstance(error, PermanentError):
        return PermanentError(f"{error}; run login again", rpc_error=error.rpc_error)
    return error


async def _sign_in(
    client: TelegramClient,
    settings: WorkerSettings,
    *,
    ask: Callable[[str], str],
    ask_secret: Callable[[str], str],
) -> None:
    phone = (
        settings.telegram_phone.get_secret_value()
        if settings.telegram_phone is not None
        else ask("Phone number (international format, e.g. +441234567890): ").strip()
    )
    sent = await client.send_code_request(phone)
    for attempt in range(3):
        code = ask_secret("Login code (sent by Telegram): ").strip()
        try:
            await client.sign_in(phone=phone, code=code, phone_code_hash=sent.phone_code_hash)
            return
        except errors.SessionPasswordNeededError:
            await client.sign_in(password=ask_secret("Two-step verification password: "))
            return
        except errors.PhoneCodeInvalidError:
            if attempt == 2:
                raise
