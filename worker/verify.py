"""``python -m worker verify``: re-check written days against the server, optionally repair.

Each day file of the chat (or of ``--from``/``--to``) is compared with what the server has for
that day now, paged like a fetch: one ``messages.getHistory`` per 100 messages, so one request
for a day of up to ~100 messages. A day *changed* when the server has messages the file lacks
(added) or content that differs (edited: text, entities, media, edit date…; view, forward,
reply and reaction counters move all the time and are not compared). Messages the file has and
the server no longer has are reported as deleted and kept: the archive keeps what was said.
``--repair`` refetches changed days (``force``), merging the new and edited messages in.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

from fleet.chats import ChatId
from worker.commands import CommandLimits, FetchCommand, day_bounds, parse_command
from worker.dayfile import iter_day_messages, read_final_header
from worker.errors import PermanentError
from worker.fetch import Fetcher, HistorySource
from worker.storage import DayStore

#: Fields that change without the message changing (counters) or that we add ourselves.
VOLATILE = frozenset({"views", "forwards", "replies_count", "reactions", "chat"})


@dataclass
class DayCheck:
    """What verifying one day found."""

    day: date
    stored: int = 0  # messages in the file
    server: int = 0  # messages the server has for the day now
    added: list[int] = field(default_factory=list)
    edited: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    pages: int = 0  # history pages read (≈ requests)
    repaired: bool = False

    @property
    def changed(self) -> bool:
        """The file lacks something the server has (deleted messages alone are kept)."""
        return bool(self.added or self.edited)

    def describe(self) -> str:
        if not self.changed and not self.deleted:
            return f"{self.day}: ok ({self.stored} messages)"
        parts = []
        if self.added:
            parts.append(f"{len(self.added)} added ({_ids(self.added)})")
        if self.edited:
            parts.append(f"{len(self.edited)} edited ({_ids(self.edited)})")
        if self.deleted:
            parts.append(f"{len(self.deleted)} deleted on the server, kept ({_ids(self.deleted)})")
        state = "changed" if self.changed else "ok"
        if self.repaired:
            state = "changed, repaired"
        return f"{self.day}: {state}: " + ", ".join(parts)


def _ids(ids: list[int], most: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return shown + (", …" if len(ids) > most else "")


def content(message: dict[str, Any]) -> dict[str, Any]:
    """What of a stored message must match the server's."""
    return {k: v for k, v in message.items() if k not in VOLATILE}


def written_days(store: DayStore, chat_key: str) -> list[date]:
    """Every day with a file in the chat's directory, oldest first."""
    root = store.data_dir / chat_key
    days = []
    for path in root.glob("[0-9][0-9][0-9][0-9]/discussions_*.json"):
        try:
            days.append(date.fromisoformat(path.stem.removeprefix("discussions_")))
        except ValueError:
            continue
    return sorted(days)


class Verifier:
    """Compares day files with the server for one chat."""

    def __init__(self, telegram: HistorySource, store: DayStore, *, tz: ZoneInfo) -> None:
        self.telegram = telegram
        self.store = store
        self.tz = tz

    async def check(self, chat: ChatId, days: Iterable[date]) -> list[DayCheck]:
        resolved = await self.telegram.resolve(chat)
        checks = []
        for day in days:
            path = self.store.day_path(chat.key, day)
            if not path.exists():
                continue
            header = await asyncio.to_thread(read_final_header, path) or {}
            recorded = header.get("chat_id")
            if isinstance(recorded, int) and recorded != resolved.peer_id:
                raise PermanentError(
                    f"CHAT_ID_CHANGED: {path} holds chat {recorded}, but {chat.display} is "
                    f"chat {resolved.peer_id} now; nothing to compare"
                )
            stored = await asyncio.to_thread(_load, path)
            check = DayCheck(day, stored=len(stored))
            start, end = day_bounds(day, self.tz)
            server: dict[int, dict[str, Any]] = {}
            async for page in self.telegram.iter_history(resolved, start, end):
                check.pages += 1
                for message in page:
                    server[message.id] = content(message.data)
            check.pages = max(check.pages, 1)
            check.server = len(server)
            check.added = sorted(set(server) - set(stored))
            check.deleted = sorted(set(stored) - set(server))
            check.edited = sorted(i for i in set(server) & set(stored) if server[i] != stored[i])
            checks.append(check)
        return checks

    async def repair(
        self, chat: ChatId, checks: list[DayCheck], fetcher: Fetcher, *, today: date
    ) -> None:
        """Refetch the changed days (force: fetched again and merged over the file)."""
        for check in checks:
            if not check.changed:
                continue
            payload = {
                "command": "fetch",
                "chat": chat.display,
                "mode": "date",
                "date": check.day.isoformat(),
                "options": {"force": True},
            }
            limits = CommandLimits(today=today, max_range_days=1)
            cmd: FetchCommand = parse_command(json.dumps(payload), limits)
            outcome = await fetcher.run(cmd)
            check.repaired = check.day in outcome.days_completed


def _load(path: Any) -> dict[int, dict[str, Any]]:
    return {int(m["id"]): content(m) for m in iter_day_messages(path)}
