"""The simulated Telegram world: deterministic chats and their history, built lazily. Pure.

A chat's history runs from ``SIM_HISTORY_START`` (UTC midnight) to *now* (the injected clock).
Day ``d`` (0-based from the start) holds a deterministic number of messages around
``SIM_MESSAGES_PER_DAY`` (a ``SIM_EMPTY_DAY_RATIO`` share of days is empty); their ids lie in
``[d*STRIDE + 1, d*STRIDE + STRIDE]``, increasing with time, with a few ids skipped ("deleted"),
so ids stay below 2**31 for ~14 years of history. Everything derives from
``(SIM_SEED, chat id, day)``: two processes, or two runs, see the same history.

Only counts are computed for the whole history (one hash per day); a day's ids, times and
per-message random bits are generated when first needed and a few days are cached, so that
streaming a million messages costs a few microseconds per message. TL objects are built fresh
for every response (like a real deserialisation), from those compact per-day arrays.
"""

from __future__ import annotations

import hashlib
import os
import random
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from telethon.tl import types

STRIDE = 400_009  # ids per day slot: > the largest SIM_MESSAGES_PER_DAY (400_000) plus gaps
DAY_S = 86_400
MAX_ID = 2**31 - 1
MAX_DAY = MAX_ID // STRIDE - 1  # ~14.7 years after SIM_HISTORY_START; later days stay empty
USERS_PER_CHAT = 40
_DAY_CACHE = 8

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


def _u64(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _unit(*parts: object) -> float:
    return _u64(*parts) / 2**64


def _signed64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


@dataclass(frozen=True, slots=True)
class SimChat:
    """One simulated supergroup."""

    id: int  # bare channel id (the marked id is -100<id>)
    access_hash: int
    title: str
    username: str | None

    @property
    def private(self) -> bool:
        return (self.username or "").lower().startswith("private")


def chat_id_for(username: str) -> int:
    """Deterministic channel id for a username (case-insensitive), in [10**9, 2*10**9)."""
    return 1_000_000_000 + _u64("chat", username.lower()) % 1_000_000_000


class _Day:
    """The compact form of one day of one chat."""

    __slots__ = ("bits", "ids", "origin", "pos", "ts")

    def __init__(
        self,
        ids: list[int],
        ts: list[int],
        bits: list[int],
        origin: _Day | None = None,
        pos: list[int] | None = None,
    ) -> None:
        self.ids = ids
        self.ts = ts
        self.bits = bits
        # A changed day keeps the day it was generated as, and each message's position there
        # (-1: added), so that the messages left unchanged are built exactly as before.
        self.origin = origin
        self.pos = pos


class World:
    """Deterministic chats and histories; ``now`` is read from the injected callable."""

    def __init__(
        self,
        *,
        seed: int,
        messages_per_day: int,
        empty_day_ratio: float,
        history_start: date,
        now: Callable[[], datetime],
        moved_usernames: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.seed = seed
        self.messages_per_day = messages_per_day
        self.empty_day_ratio = empty_day_ratio
        self.start = datetime(
            history_start.year, history_start.month, history_start.day, tzinfo=UTC
        )
        self.start_ts = int(self.start.timestamp())
        self._now = now
        self._chats_by_id: dict[int, SimChat] = {}
        self._cum: dict[int, list[int]] = {}  # chat id → cumulative full-day counts
        self._days: OrderedDict[tuple[int, int], _Day] = OrderedDict()
        self._users: dict[int, list[types.User]] = {}
        self._channels: dict[int, types.Channel] = {}
        self._moved: set[str] = set()  # usernames now held by another chat
        # Days changed after they were generated (deleted, added, edited messages): kept out
        # of the LRU so a change is never forgotten.
        self._changed: dict[tuple[int, int], _Day] = {}
        self._edited: dict[tuple[int, int], int] = {}  # (chat id, message id) → edit unix ts
        for name in moved_usernames:
            self.move_username(name.strip())

    def move_username(self, username: str) -> None:
        """The username is released by its chat and taken by another (Telegram lets names be
        reclaimed and sold): it resolves to a new chat, the old chat has no username."""
        name = username.lower()
        self._moved.add(name)
        old_id = chat_id_for(name)
        old = self._chats_by_id.get(old_id) or self.chat_by_id(old_id)
        if old is not None:
            self._chats_by_id[old_id] = SimChat(old.id, old.access_hash, old.title, None)
            self._channels.pop(old_id, None)

    # --- chats ------------------------------------------------------------------------------

    def chat_by_username(self, username: str) -> SimChat | None:
        """The chat a username resolves to; ``None`` for names that do not exist."""
        name = username.lower()
        if name.startswith(("missing", "nonexist")):
            return None
        chat_id = chat_id_for(name + "#moved") if name in self._moved else chat_id_for(name)
        chat = self._chats_by_id.get(chat_id)
        if chat is None or chat.username is None:
            chat = SimChat(
                id=chat_id,
                access_hash=self._access_hash(chat_id),
                title=f"Sim {username}",
                username=username,
            )
            self._chats_by_id[chat_id] = chat
        return chat

    def chat_by_id(self, chat_id: int) -> SimChat | None:
        """A chat by bare channel id: known, or synthetic (ids below 1000 do not exist)."""
        chat = self._chats_by_id.get(chat_id)
        if chat is not None:
            return chat
        if chat_id < 1000 or chat_id >= 2**40:
            return None
        chat = SimChat(
            id=chat_id,
            access_hash=self._access_hash(chat_id),
            title=f"Sim chat {chat_id}",
            username=None,
        )
        self._chats_by_id[chat_id] = chat
        return chat

    def _access_hash(self, chat_id: int) -> int:
        return _signed64(_u64("hash", self.seed, chat_id))

    def channel(self, chat: SimChat) -> types.Channel:
        """The TL ``Channel`` (a megagroup) for a chat; cached, never mutated by Telethon."""
        channel = self._channels.get(chat.id)
        if channel is None:
            channel = types.Channel(
                id=chat.id,
                title=chat.title,
                photo=types.ChatPhotoEmpty(),
                date=self.start,
                megagroup=True,
                access_hash=chat.access_hash,
                username=chat.username,
            )
            self._channels[chat.id] = channel
        return channel

    def users(self, chat: SimChat) -> list[types.User]:
        users = self._users.get(chat.id)
        if users is None:
            users = []
            for i in range(USERS_PER_CHAT):
                uid = 100_000_000 + _u64("user", self.seed, chat.id, i) % 5_000_000_000
                users.append(
                    types.User(
                        id=uid,
                        access_hash=_signed64(_u64("uhash", uid)),
                        first_name=f"User{i}",
                        username=f"simuser_{uid}",
                    )
                )
            self._users[chat.id] = users
        return users

    # --- counts and positions ----------------------------------------------------------------

    def now_ts(self) -> int:
        return int(self._now().timestamp())

    def day_count(self, chat_id: int, day: int) -> int:
        """How many messages day ``day`` has in full (today's may not all be visible yet)."""
        changed = self._changed.get((chat_id, day))
        if changed is not None:
            return len(changed.ids)
        if day < 0 or day > MAX_DAY or self.messages_per_day == 0:
            return 0
        if _unit("empty", self.seed, chat_id, day) < self.empty_day_ratio:
            return 0
        spread = 0.6 + 0.8 * _unit("count", self.seed, chat_id, day)
        return max(1, min(STRIDE - 2, round(self.messages_per_day * spread)))

    def _cumulative(self, chat_id: int, upto_day: int) -> list[int]:
        """``cum[d]`` = messages in days ``< d``, for ``d`` in ``[0, upto_day]``."""
        cum = self._cum.get(chat_id)
        if cum is None:
            cum = [0]
            self._cum[chat_id] = cum
        while len(cum) <= upto_day:
            d = len(cum) - 1
            cum.append(cum[-1] + self.day_count(chat_id, d))
        return cum

    def day(self, chat_id: int, day: int) -> _Day:
        """The full (not clipped to now) compact data of one day; cached LRU."""
        key = (chat_id, day)
        changed = self._changed.get(key)
        if changed is not None:
            return changed
        cached = self._days.get(key)
        if cached is not None:
            self._days.move_to_end(key)
            return cached
        n = self.day_count(chat_id, day)
        rng = random.Random(_u64("day", self.seed, chat_id, day))
        if n:
            span = min(STRIDE, n + max(1, n // 50))
            base = day * STRIDE + 1
            ids = [base + k for k in sorted(rng.sample(range(span), n))]
            day_ts = self.start_ts + day * DAY_S
            ts = sorted(day_ts + rng.randrange(DAY_S) for _ in range(n))
            bits = [rng.getrandbits(64) for _ in range(n)]
        else:
            ids, ts, bits = [], [], []
        built = _Day(ids, ts, bits)
        self._days[key] = built
        if len(self._days) > _DAY_CACHE:
            self._days.popitem(last=False)
        return built

    def change_day(
        self, chat_id: int, day: int, *, delete: int = 0, add: int = 0, edit: int = 0
    ) -> dict[str, list[int]]:
        """Change a day behind the fetcher's back: delete ``delete`` messages, add ``add`` in
        the day's id gaps (dated like their predecessor, so ids still grow with time), edit
        ``edit`` (new text, ``edit_date`` = now). Returns the ids touched, by kind."""
        built = self.day(chat_id, day)
        origin = built.origin or built
        ids, ts, bits = list(built.ids), list(built.ts), list(built.bits)
        pos = list(built.pos) if built.pos is not None else list(range(len(ids)))
        deleted: list[int] = []
        for _ in range(min(delete, len(ids))):
            k = len(ids) // 2
            deleted.append(ids[k])
            del ids[k], ts[k], bits[k], pos[k]
        added: list[int] = []
        taken = set(ids) | set(deleted)
        gaps = [i for i in range(ids[0] + 1, ids[-1]) if i not in taken] if ids else []
        if ids:  # then after the day's last id, inside its id slot
            gaps += range(ids[-1] + 1, min(ids[-1] + 1 + add, (day + 1) * STRIDE + 1))
        for msg_id in gaps[:add]:
            k = bisect_left(ids, msg_id)
            ids.insert(k, msg_id)
            ts.insert(k, ts[k - 1])
            bits.insert(k, _u64("added", self.seed, chat_id, msg_id))
            pos.insert(k, -1)
            added.append(msg_id)
        # Service messages have no text to edit: pick among the others, spread over the day.
        texts = [k for k in range(len(ids)) if (bits[k] >> 8) & 0xFF >= 4]
        step = max(1, len(texts) // max(1, edit))
        edited = [ids[k] for k in texts[::step]][:edit]
        for msg_id in edited:
            self._edited[(chat_id, msg_id)] = self.now_ts()
        cum = self._cumulative(chat_id, day)
        self._changed[(chat_id, day)] = _Day(ids, ts, bits, origin, pos)
        delta = len(ids) - len(built.ids)
        for d in range(day + 1, len(cum)):
            cum[d] += delta
        return {"deleted": deleted, "added": added, "edited": edited}

    def day_index(self, msg_id: int) -> int:
        """The day slot a message id belongs to."""
        return (msg_id - 1) // STRIDE

    def _visible(self, chat_id: int) -> tuple[int, int, list[int], int]:
        """``(today, visible_today, cum, total)`` as of now."""
        now = self.now_ts()
        today = (now - self.start_ts) // DAY_S
        if today < 0:
            return -1, 0, [0], 0
        cum = self._cumulative(chat_id, today)
        today_day = self.day(chat_id, today)
        visible_today = bisect_right(today_day.ts, now)
        return today, visible_today, cum, cum[today] + visible_today

    def total(self, chat_id: int) -> int:
        return self._visible(chat_id)[3]

    def count_id_below(self, chat_id: int, msg_id: int) -> int:
        """How many visible messages have ``id < msg_id``."""
        today, visible_today, cum, total = self._visible(chat_id)
        if msg_id <= 1 or today < 0:
            return 0
        d = (msg_id - 1) // STRIDE
        if d > today:
            return total
        k = bisect_left(self.day(chat_id, d).ids, msg_id)
        if d == today:
            k = min(k, visible_today)
        return cum[d] + k

    def count_date_below(self, chat_id: int, ts: int) -> int:
        """How many visible messages have ``date < ts`` (unix seconds)."""
        today, visible_today, cum, total = self._visible(chat_id)
        if ts <= self.start_ts or today < 0:
            return 0
        d = (ts - self.start_ts) // DAY_S
        if d > today:
            return total
        k = bisect_left(self.day(chat_id, d).ts, ts)
        if d == today:
            k = min(k, visible_today)
        return cum[d] + k

    def locate(self, chat_id: int, index: int) -> tuple[int, int]:
        """The ``(day, k)`` of the visible message at ascending position ``index``."""
        cum = self._cum[chat_id]
        d = bisect_right(cum, index) - 1
        return d, index - cum[d]

    # --- ground truth and TL objects -----------------------------------------------------------

    def messages_between(
        self, chat_id: int, start: datetime, end: datetime
    ) -> list[tuple[int, int]]:
        """Ground truth for tests: ``(id, unix ts)`` of visible messages, start <= date < end."""
        lo = self.count_date_below(chat_id, int(start.timestamp()))
        hi = self.count_date_below(chat_id, int(end.timestamp()))
        out = []
        for i in range(lo, hi):
            d, k = self.locate(chat_id, i)
            day = self.day(chat_id, d)
            out.append((day.ids[k], day.ts[k]))
        return out

    def history_slice(self, chat: SimChat, lo: int, hi: int) -> list[Any]:
        """TL messages at ascending positions ``[lo, hi)``, returned newest first."""
        out: list[Any] = []
        peer = types.PeerChannel(chat.id)
        users = self.users(chat)
        i = hi - 1
        while i >= lo:
            d, k = self.locate(chat.id, i)
            day = self.day(chat.id, d)
            while k >= 0 and i >= lo:
                out.append(self._build(day, k, peer, users))
                k -= 1
                i -= 1
        return out

    def _build(self, day: _Day, k: int, peer: types.PeerChannel, users: list[types.User]) -> Any:
        msg_id = day.ids[k]
        when = datetime.fromtimestamp(day.ts[k], UTC)
        r = day.bits[k]
        user = users[r % USERS_PER_CHAT]
        from_id = types.PeerUser(user.id)
        kind = (r >> 8) & 0xFF  # 0..255 decides the message's shape
        if kind < 4:  # ~1.5%: service messages
            action: Any
            if kind < 2:
                action = types.MessageActionChatAddUser(users=[user.id])
            elif kind == 2:
                action = types.MessageActionChatJoinedByRequest()
            else:
                action = types.MessageActionPinMessage()
            return types.MessageService(
                id=msg_id, peer_id=peer, date=when, action=action, from_id=from_id
            )
        words = [_WORDS[(r >> (16 + 3 * j)) % len(_WORDS)] for j in range(3 + (r >> 40) % 6)]
        text = " ".join(words)
        entities: list[Any] = []
        if (r >> 48) & 7 == 0:  # 1/8: a link
            url = f"https://example.org/p/{msg_id}"
            entities.append(types.MessageEntityUrl(offset=len(text) + 1, length=len(url)))
            text = f"{text} {url}"
        if (r >> 51) & 7 == 1:  # 1/8: bold first word
            entities.insert(0, types.MessageEntityBold(offset=0, length=len(words[0])))
        reply_to = None
        ids_of, at = day.ids, k
        if day.origin is not None and day.pos is not None:
            ids_of, at = day.origin.ids, day.pos[k]  # as generated (-1: added, no reply)
        if at > 0 and (r >> 54) & 3 == 0:  # 1/4: replies to an earlier message of the day
            back = 1 + (r >> 12) % min(at, 50)
            reply_to = types.MessageReplyHeader(reply_to_msg_id=ids_of[at - back])
        media: Any = None
        if 4 <= kind < 24:  # ~8%: media
            media = _media(kind, msg_id, when)
        edit_date = when + timedelta(seconds=30 + (r >> 20) % 3600) if kind >= 236 else None
        edited_at = self._edited.get((peer.channel_id, msg_id))
        if edited_at is not None:
            text = f"{text} (edited)"
            edit_date = datetime.fromtimestamp(edited_at, UTC)
        replies = None
        if (r >> 56) & 7 == 0:
            replies = types.MessageReplies(replies=(r >> 24) % 12, replies_pts=0)
        reactions = None
        if (r >> 59) & 7 == 0:
            reactions = types.MessageReactions(
                results=[
                    types.ReactionCount(
                        reaction=types.ReactionEmoji(_EMOJI[(r >> 28) % len(_EMOJI)]),
                        count=1 + (r >> 32) % 9,
                    )
                ]
            )
        fwd_from = None
        if 24 <= kind < 28:
            fwd_from = types.MessageFwdHeader(date=when - timedelta(days=1), from_name="Someone")
        return types.Message(
            id=msg_id,
            peer_id=peer,
            date=when,
            message=text,
            from_id=from_id,
            reply_to=reply_to,
            media=media,
            entities=entities or None,
            views=(r >> 16) % 5000,
            forwards=(r >> 36) % 20,
            replies=replies,
            edit_date=edit_date,
            reactions=reactions,
            fwd_from=fwd_from,
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


# --- runtime append (issue 14) ---------------------------------------------------------------


class Horizon:
    """A clock for :class:`World` that lets messages appear at runtime, on demand.

    With ``SIM_HORIZON_FILE`` set, the world's *now* is the earlier of the real clock and the
    Unix time written in that file (re-read when the file changes; absent or unreadable: the
    real clock). Raising the number appends to the chats, in every worker process at once,
    exactly the messages the deterministic history has between the old and the new horizon —
    so a test can make "new messages" arrive between two scheduler ticks and still compare the
    result with a one-shot fetch of the same world. Keep it within today: the worker's notion
    of a complete day follows the real clock.
    """

    def __init__(self, now: Callable[[], datetime], path: Path) -> None:
        self._now = now
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value: datetime | None = None

    def __call__(self) -> datetime:
        real = self._now()
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # write it with os.replace
            if stamp != self._stamp:
                raw = self._path.read_text(encoding="utf-8").strip()
                self._value = datetime.fromtimestamp(float(raw), UTC) if raw else None
                self._stamp = stamp
        except (OSError, ValueError, OverflowError):
            return real
        return real if self._value is None else min(real, self._value)
