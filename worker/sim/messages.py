"""The simulator's TL messages, built from a day's compact arrays (ids, times, random bits).

A message's shape (service or text, links, bold, replies, media, edits, reactions, forwards)
is decided by its 64 random bits alone, so the same message is built the same way in every
process and every run. Objects are built fresh for every response, like a real
deserialisation; nothing here keeps state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from telethon.tl import types

if TYPE_CHECKING:
    from worker.sim.history import _Day

USERS_PER_CHAT = 40

_WORDS = [
    "python",
    "asyncio",
    "redis",
    "telethon",
    "worker",
    "release",
    "bug",
    "patch",
    "review",
    "test",
    "deploy",
    "queue",
    "metric",
    "latency",
    "schema",
    "json",
    "backup",
    "cluster",
    "docker",
    "kernel",
    "build",
    "cache",
    "thread",
    "lock",
    "token",
    "index",
    "parser",
    "daemon",
    "signal",
    "socket",
    "stream",
    "buffer",
    "memory",
    "profile",
    "benchmark",
    "question",
    "answer",
]
_EMOJI = ("👍", "❤", "🔥", "😂", "🎉")


def build_message(
    day: _Day, k: int, peer: types.PeerChannel, users: list[types.User], edited_at: int | None
) -> Any:
    """The TL message ``k`` of ``day``; ``edited_at``: when a change edited it (unix seconds)."""
    msg_id = day.ids[k]
    when = datetime.fromtimestamp(day.ts[k], UTC)
    r = day.bits[k]
    user = users[r % USERS_PER_CHAT]
    from_id = types.PeerUser(user.id)
    kind = (r >> 8) & 0xFF  # 0..255 decides the message's shape
    if kind < 4:  # ~1.5%: service messages
        return _service(kind, msg_id, peer, when, user.id)
    text, entities = _text(r, msg_id)
    edit_date = when + timedelta(seconds=30 + (r >> 20) % 3600) if kind >= 236 else None
    if edited_at is not None:
        text = f"{text} (edited)"
        edit_date = datetime.fromtimestamp(edited_at, UTC)
    replies = None
    if (r >> 56) & 7 == 0:
        replies = types.MessageReplies(replies=(r >> 24) % 12, replies_pts=0)
    fwd_from = None
    if 24 <= kind < 28:
        fwd_from = types.MessageFwdHeader(date=when - timedelta(days=1), from_name="Someone")
    return types.Message(
        id=msg_id,
        peer_id=peer,
        date=when,
        message=text,
        from_id=from_id,
        reply_to=_reply_to(day, k, r),
        media=_media(kind, msg_id, when) if 4 <= kind < 24 else None,  # ~8%: media
        entities=entities or None,
        views=(r >> 16) % 5000,
        forwards=(r >> 36) % 20,
        replies=replies,
        edit_date=edit_date,
        reactions=_reactions(r),
        fwd_from=fwd_from,
    )


def _service(
    kind: int, msg_id: int, peer: types.PeerChannel, when: datetime, user_id: int
) -> types.MessageService:
    action: Any
    if kind < 2:
        action = types.MessageActionChatAddUser(users=[user_id])
    elif kind == 2:
        action = types.MessageActionChatJoinedByRequest()
    else:
        action = types.MessageActionPinMessage()
    return types.MessageService(
        id=msg_id, peer_id=peer, date=when, action=action, from_id=types.PeerUser(user_id)
    )


def _text(r: int, msg_id: int) -> tuple[str, list[Any]]:
    """A few words; 1/8 of messages end with a link, 1/8 have a bold first word."""
    words = [_WORDS[(r >> (16 + 3 * j)) % len(_WORDS)] for j in range(3 + (r >> 40) % 6)]
    text = " ".join(words)
    entities: list[Any] = []
    if (r >> 48) & 7 == 0:  # 1/8: a link
        url = f"https://example.org/p/{msg_id}"
        entities.append(types.MessageEntityUrl(offset=len(text) + 1, length=len(url)))
        text = f"{text} {url}"
    if (r >> 51) & 7 == 1:  # 1/8: bold first word
        entities.insert(0, types.MessageEntityBold(offset=0, length=len(words[0])))
    return text, entities


def _reply_to(day: _Day, k: int, r: int) -> types.MessageReplyHeader | None:
    """1/4 of messages reply to an earlier message of the day, as the day was generated."""
    ids_of, at = day.ids, k
    if day.origin is not None and day.pos is not None:
        ids_of, at = day.origin.ids, day.pos[k]  # as generated (-1: added, no reply)
    if at > 0 and (r >> 54) & 3 == 0:
        back = 1 + (r >> 12) % min(at, 50)
        return types.MessageReplyHeader(reply_to_msg_id=ids_of[at - back])
    return None


def _reactions(r: int) -> types.MessageReactions | None:
    if (r >> 59) & 7 != 0:
        return None
    return types.MessageReactions(
        results=[
            types.ReactionCount(
                reaction=types.ReactionEmoji(_EMOJI[(r >> 28) % len(_EMOJI)]),
                count=1 + (r >> 32) % 9,
            )
        ]
    )


def _media(kind: int, msg_id: int, when: datetime) -> Any:
    pick = kind % 5
    if pick == 0:
        return types.MessageMediaPhoto(photo=types.PhotoEmpty(id=msg_id))
    attributes: list[Any]
    if pick == 1:
        attributes = [types.DocumentAttributeVideo(duration=12, w=640, h=360)]
    elif pick == 2:
        attributes = [types.DocumentAttributeAudio(duration=7, voice=True)]
    elif pick == 3:
        attributes = [
            types.DocumentAttributeSticker(alt="🙂", stickerset=types.InputStickerSetEmpty())
        ]
    else:
        attributes = [types.DocumentAttributeFilename(file_name=f"file{msg_id}.pdf")]
    document = types.Document(
        id=msg_id,
        access_hash=0,
        file_reference=b"",
        date=when,
        mime_type="application/octet-stream",
        size=1024,
        dc_id=2,
        attributes=attributes,
    )
    return types.MessageMediaDocument(document=document)
