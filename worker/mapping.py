"""Telethon messages → the message dicts written into day files (schema 1.0.0, seed 001).

Always present, in this order: ``id``, ``date``, ``from_id``, ``chat``, ``text``, ``reply_to``,
``views``, ``forwards``, ``replies_count``, ``entities``. Present only when the message has them,
in this order after the first ten: ``edit_date``, ``reactions``, ``media``, ``fwd_from``,
``grouped_id``, ``topic_id``, ``post_author``, ``action``. The fixed order keeps re-runs
byte-identical, so a re-fetch changes nothing but what really changed.

This module reads only raw TL fields (``.message``, not ``.text``, which needs a client), so it
works on messages built without a client and is the same for the real and the simulated backend.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from telethon.tl import types

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_snake_cache: dict[type, str] = {}


def _snake(cls: type, prefix: str) -> str:
    """``MessageEntityTextUrl`` → ``text_url``; cached per class (called per entity)."""
    name = _snake_cache.get(cls)
    if name is None:
        name = _CAMEL.sub("_", cls.__name__.removeprefix(prefix)).lower() or "unknown"
        _snake_cache[cls] = name
    return name


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # Telethon gives aware UTC; be safe with hand-built objects
        moment = moment.replace(tzinfo=UTC)
    elif moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # %-formatting: 2.5x faster than strftime, and this runs once or twice per message.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (  # noqa: UP031
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
    )


def peer_id(peer: Any) -> int | None:
    """The bare id of a ``PeerUser`` / ``PeerChannel`` / ``PeerChat`` (``None`` for no peer)."""
    if peer is None:
        return None
    if isinstance(peer, types.PeerUser):
        return int(peer.user_id)
    if isinstance(peer, types.PeerChannel):
        return int(peer.channel_id)
    if isinstance(peer, types.PeerChat):
        return int(peer.chat_id)
    return None


def _entities(msg: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ent in msg.entities or ():
        item: dict[str, Any] = {
            "type": _snake(type(ent), "MessageEntity"),
            "offset": ent.offset,
            "length": ent.length,
        }
        if isinstance(ent, types.MessageEntityTextUrl):
            item["url"] = ent.url
        elif isinstance(ent, types.MessageEntityMentionName):
            item["user_id"] = ent.user_id
        elif isinstance(ent, types.InputMessageEntityMentionName):
            item["user_id"] = getattr(ent.user_id, "user_id", None)
        elif isinstance(ent, types.MessageEntityCustomEmoji):
            item["document_id"] = str(ent.document_id)
        elif isinstance(ent, types.MessageEntityPre) and ent.language:
            item["language"] = ent.language
        out.append(item)
    return out


def _reactions(reactions: Any) -> dict[str, int] | None:
    results = getattr(reactions, "results", None)
    if not results:
        return None
    out: dict[str, int] = {}
    for rc in results:
        reaction = rc.reaction
        if isinstance(reaction, types.ReactionEmoji):
            key = reaction.emoticon
        elif isinstance(reaction, types.ReactionCustomEmoji):
            key = str(reaction.document_id)
        elif isinstance(reaction, types.ReactionPaid):
            key = "paid"
        else:
            key = "other"
        out[key] = out.get(key, 0) + int(rc.count)
    return out


def media_kind(media: Any) -> str | None:
    """A short kind for a message's media, or ``None`` when there is none."""
    if media is None or isinstance(media, types.MessageMediaEmpty):
        return None
    if isinstance(media, types.MessageMediaPhoto):
        return "photo"
    if isinstance(media, types.MessageMediaDocument):
        return _document_kind(media.document)
    if isinstance(media, types.MessageMediaPoll):
        return "poll"
    if isinstance(
        media, types.MessageMediaGeo | types.MessageMediaGeoLive | types.MessageMediaVenue
    ):
        return "geo"
    if isinstance(media, types.MessageMediaContact):
        return "contact"
    if isinstance(media, types.MessageMediaWebPage):
        return "webpage"
    return "other"


def _document_kind(document: Any) -> str:
    attributes = getattr(document, "attributes", None) or ()
    kind = "document"
    for attr in attributes:
        if isinstance(attr, types.DocumentAttributeSticker):
            return "sticker"
        if isinstance(attr, types.DocumentAttributeAudio):
            return "voice" if attr.voice else "audio"
        if isinstance(attr, types.DocumentAttributeVideo):
            kind = "video"  # keep looking: a sticker or voice note may also carry it
    return kind


def _fwd_from(fwd: Any) -> dict[str, Any]:
    return {
        "from_id": peer_id(fwd.from_id),
        "from_name": fwd.from_name,
        "date": _iso(fwd.date) if fwd.date else None,
    }


def _topic_id(reply_to: Any) -> int | None:
    if not isinstance(reply_to, types.MessageReplyHeader):
        return None
    if reply_to.reply_to_top_id:
        return int(reply_to.reply_to_top_id)
    if reply_to.forum_topic and reply_to.reply_to_msg_id:
        # A message posted straight into a topic replies to the topic's first message.
        return int(reply_to.reply_to_msg_id)
    return None


def message_to_dict(msg: Any, chat_display: str) -> dict[str, Any]:
    """Map a ``types.Message`` or ``types.MessageService`` to the file schema (see module doc)."""
    reply_to = msg.reply_to
    reply_id = reply_to.reply_to_msg_id if isinstance(reply_to, types.MessageReplyHeader) else None
    replies = getattr(msg, "replies", None)
    out: dict[str, Any] = {
        "id": msg.id,
        "date": _iso(msg.date),
        "from_id": peer_id(msg.from_id),
        "chat": chat_display,
        "text": getattr(msg, "message", None) or "",
        "reply_to": reply_id,
        "views": getattr(msg, "views", None),
        "forwards": getattr(msg, "forwards", None),
        "replies_count": replies.replies if replies is not None else None,
        "entities": _entities(msg) if getattr(msg, "entities", None) else [],
    }
    edit_date = getattr(msg, "edit_date", None)
    if edit_date is not None:
        out["edit_date"] = _iso(edit_date)
    if msg.reactions is not None:
        reactions = _reactions(msg.reactions)
        if reactions:
            out["reactions"] = reactions
    kind = media_kind(getattr(msg, "media", None))
    if kind is not None:
        out["media"] = kind
    fwd = getattr(msg, "fwd_from", None)
    if fwd is not None:
        out["fwd_from"] = _fwd_from(fwd)
    grouped_id = getattr(msg, "grouped_id", None)
    if grouped_id is not None:
        out["grouped_id"] = grouped_id
    topic_id = _topic_id(reply_to)
    if topic_id is not None:
        out["topic_id"] = topic_id
    post_author = getattr(msg, "post_author", None)
    if post_author:
        out["post_author"] = post_author
    action = getattr(msg, "action", None)
    if action is not None and isinstance(msg, types.MessageService):
        out["action"] = _snake(type(action), "MessageAction")
    return out
