"""Resolving a command's chat to Telegram's identity for it, cached per session.

Telegram limits resolving far more than reading, so a session resolves each name or id once:
from the session file's own entity cache when it knows the chat (no request at all), else with
``contacts.resolveUsername`` / ``channels.getChannels``. A name taken from the cache is marked
``cached`` and confirmed against the next history answer (:mod:`worker.rightchat`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from telethon import errors, utils
from telethon.tl import functions, types

from fleet.chats import ChatId
from worker.errors import PermanentError, TelegramError
from worker.rpcerrors import translate
from worker.tgclient import GatedClient


@dataclass(frozen=True, slots=True)
class ResolvedChat:
    """A chat this session can read: what the command named plus Telegram's identity for it."""

    chat: ChatId
    peer_id: int  # marked id: -100… for channels/supergroups, -… for basic groups
    title: str
    username: str | None
    input_peer: Any = field(repr=False, compare=False)  # opaque; only the boundary reads it
    #: Taken from a cache (the session file's entities): trusted only once a history answer
    #: shows the chat still has this username (usernames are released and reclaimed).
    cached: bool = field(default=False, compare=False)


def cache_key(chat: ChatId) -> str | int:
    """Names are case-insensitive; ids are themselves."""
    return chat.lookup.lower() if isinstance(chat.lookup, str) else chat.lookup


class ChatResolver:
    """One session's resolved chats, and how to resolve one it has not seen."""

    def __init__(self) -> None:
        self._resolved: dict[str | int, ResolvedChat] = {}

    def forget(self, key: str | int) -> None:
        self._resolved.pop(key, None)

    def remember(self, key: str | int, resolved: ResolvedChat) -> None:
        self._resolved[key] = resolved

    def cached(self, chat: ChatId) -> ResolvedChat | None:
        """The chat as resolved earlier, or ``None``; a name is marked ``cached``: it may have
        moved since, and is checked on the next answer."""
        hit = self._resolved.get(cache_key(chat))
        return None if hit is None else replace(hit, cached=isinstance(chat.lookup, str))

    async def resolve(self, client: GatedClient, chat: ChatId) -> ResolvedChat:
        """Find the chat; cached per session (Telegram limits resolving far more than reading)."""
        hit = self.cached(chat)
        if hit is not None:
            return hit
        try:
            if isinstance(chat.lookup, str):
                resolved = await self.resolve_username(client, chat)
            else:
                resolved = await self._resolve_id(client, chat)
        except TelegramError:
            raise
        except (errors.RPCError, OSError, ValueError, TypeError) as exc:
            raise translate(exc, "resolve") from exc
        self._resolved[cache_key(chat)] = resolved
        return resolved

    async def resolve_username(
        self, client: GatedClient, chat: ChatId, *, network: bool = False
    ) -> ResolvedChat:
        """By name: the session's cache first (unless ``network``), then one request."""
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
        return _from_entity(chat, entity)

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
        return _from_entity(chat, result.chats[0])


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


def _entity_for(peer: Any, chats: list[Any], users: list[Any]) -> Any:
    wanted = utils.get_peer_id(peer)
    for entity in (*chats, *users):
        if utils.get_peer_id(entity) == wanted:
            return entity
    raise PermanentError("Telegram resolved the name to nothing usable")
