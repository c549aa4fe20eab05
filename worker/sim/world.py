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
for every response (like a real deserialisation), from those compact per-day arrays
(:mod:`worker.sim.messages`); the clock that lets messages arrive at runtime is
:mod:`worker.sim.horizon`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from telethon.tl import types

from worker.sim.changes import change
from worker.sim.history import (
    DAY_S,
    MAX_DAY,
    MAX_ID,
    STRIDE,
    _Day,
    _signed64,
    _u64,
    generate_day,
    generated_count,
)
from worker.sim.messages import USERS_PER_CHAT, build_message

__all__ = ["DAY_S", "MAX_DAY", "MAX_ID", "STRIDE", "SimChat", "World", "chat_id_for"]

_DAY_CACHE = 8


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
        return generated_count(self.seed, chat_id, day, self.messages_per_day, self.empty_day_ratio)

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
        built = generate_day(self.seed, chat_id, day, self.day_count(chat_id, day), self.start_ts)
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
        done = change(
            built, seed=self.seed, chat_id=chat_id, day=day, delete=delete, add=add, edit=edit
        )
        for msg_id in done.edited:
            self._edited[(chat_id, msg_id)] = self.now_ts()
        cum = self._cumulative(chat_id, day)
        self._changed[(chat_id, day)] = done.day
        delta = len(done.day.ids) - len(built.ids)
        for d in range(day + 1, len(cum)):
            cum[d] += delta
        return {"deleted": done.deleted, "added": done.added, "edited": done.edited}

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
                out.append(
                    build_message(day, k, peer, users, self._edited.get((chat.id, day.ids[k])))
                )
                k -= 1
                i -= 1
        return out
