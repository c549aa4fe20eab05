"""Right-chat checks: never write one chat's messages under another chat's name.

Two checks, at the two places a chat's identity can silently change:

* :func:`confirm` — a username resolved from the session's cache may have been released and
  reclaimed by another chat since: the first history answer must still be that chat, with that
  name, or the name is re-resolved and ``ChatMoved`` raised before anything is written.
* :func:`check_same_chat` — the chat's directory may hold days of another chat the name named
  before: the fetcher refuses (``CHAT_ID_CHANGED``) rather than merge two chats.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger
from telethon import utils

from worker.commands import FetchCommand
from worker.dayfile import read_final_header
from worker.errors import ChatMoved, PermanentError
from worker.resolver import ChatResolver, ResolvedChat
from worker.storage import DayStore
from worker.tgclient import GatedClient

#: How many day files without a recorded ``chat_id`` are read before giving up on the check.
_FILES_LOOKED_AT = 3


async def confirm(
    resolver: ChatResolver, client: GatedClient, chat: ResolvedChat, entity: Any
) -> None:
    """Check a history answer's chat against what was resolved from a cache.

    The answer's chat must be the resolved one and still carry the username the command
    named. If not, the username moved: the cache entry is dropped, the name re-resolved
    over the network, and ``ChatMoved`` raised before anything is written.
    """
    if not chat.cached or entity is None or not isinstance(chat.chat.lookup, str):
        return
    wanted = str(chat.chat.lookup).lower()
    names = usernames(entity)
    if utils.get_peer_id(entity) == chat.peer_id and wanted in names:
        return
    key = wanted
    resolver.forget(key)
    try:
        fresh = await resolver.resolve_username(client, chat.chat, network=True)
    except PermanentError as exc:
        fresh_text = f"it names no chat now ({exc})"
    else:
        resolver.remember(key, fresh)
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


def usernames(entity: Any) -> set[str]:
    """Every username a chat has now (its main one and any collectible ones), lower-cased."""
    names = {str(entity.username).lower()} if getattr(entity, "username", None) else set()
    for extra in getattr(entity, "usernames", None) or []:
        if getattr(extra, "active", True) and getattr(extra, "username", None):
            names.add(str(extra.username).lower())
    return names


def chat_in(result: Any, peer_id: int) -> Any:
    """The answer's chat: the one with the asked peer id (or, failing that, the first)."""
    chats = list(getattr(result, "chats", []) or [])
    for entity in chats:
        if utils.get_peer_id(entity) == peer_id:
            return entity
    return chats[0] if chats else None


async def check_same_chat(store: DayStore, cmd: FetchCommand, chat: ResolvedChat) -> None:
    """Refuse to write a chat into a directory that holds another chat's days (the name
    moved to another chat since they were written): two chats must never be merged."""
    recorded = await asyncio.to_thread(recorded_chat_id, store, cmd.chat.key)
    if recorded is None or recorded == chat.peer_id:
        return
    raise PermanentError(
        f"CHAT_ID_CHANGED: {cmd.chat.display} is chat {chat.peer_id} now, but "
        f"{store.data_dir / cmd.chat.key} holds chat {recorded}'s days (the name "
        "moved to another chat); refusing to merge two chats: move that directory away, "
        "or fetch the old chat by its id",
        rpc_error="CHAT_ID_CHANGED",
    )


def recorded_chat_id(store: DayStore, chat_key: str) -> int | None:
    """The ``chat_id`` of the newest day file of the chat's directory that records one
    (files written before ids were recorded have none); a few files at most are read."""
    root = store.data_dir / chat_key
    try:
        years = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)
    except FileNotFoundError:
        return None
    looked = 0
    for year in years:
        for path in sorted(year.glob("discussions_*.json"), reverse=True):
            try:
                header = read_final_header(path)
            except OSError:
                continue
            chat_id = (header or {}).get("chat_id")
            if isinstance(chat_id, int):
                return chat_id
            looked += 1
            if looked >= _FILES_LOOKED_AT:
                return None
    return None
