"""Chat identifiers: what a command may name, and the directory-safe key derived from it.

Accepted: ``@username``, ``username``, ``https://t.me/username`` (or ``t.me/…``,
``telegram.me/…``), and numeric ids (``-1001234567890``, ``1234``). The key used under
``DATA_DIR`` is the username without ``@`` (lower-cased, Telegram usernames being
case-insensitive) or the numeric id, reduced to ``[A-Za-z0-9_-]``; it can never contain a path
separator or ``..``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_USERNAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{3,31}")
_LINK = re.compile(r"^(?:https?://)?(?:www\.)?(?:t|telegram)\.me/(?:s/)?([^/?#\s]+)/?$", re.I)
_NUMERIC = re.compile(r"-?\d{1,20}")


@dataclass(frozen=True, slots=True)
class ChatId:
    """A chat as named by a command, normalised."""

    lookup: str | int  # username without "@" (str) or a numeric id (int, e.g. -1001234567890)
    key: str  # directory name under DATA_DIR, [A-Za-z0-9_-]+
    display: str  # "@username" or "-1001234567890", written into files and events


def parse_chat(raw: str) -> ChatId:
    """Normalise what a command calls a chat; ``ValueError`` with a readable reason if invalid."""
    if not isinstance(raw, str):
        raise ValueError("chat must be a string")
    text = raw.strip()
    if not text:
        raise ValueError("chat is empty")
    if len(text) > 256:
        raise ValueError("chat is longer than 256 characters")
    if _NUMERIC.fullmatch(text):
        number = int(text)
        if number == 0 or abs(number) >= 2**63:
            raise ValueError(f"chat id {text} is out of range")
        return ChatId(lookup=number, key=str(number), display=str(number))
    link = _LINK.match(text)
    name = link.group(1) if link else text.removeprefix("@")
    if name.startswith("+") or name.lower() == "joinchat":
        raise ValueError("invite links are not supported; use the chat's username or id")
    if not _USERNAME.fullmatch(name):
        raise ValueError(
            "chat must be @username (4-32 letters, digits, underscores, starting with a letter), "
            "a t.me link, or a numeric id"
        )
    key = re.sub(r"[^A-Za-z0-9_-]", "", name.lower())
    return ChatId(lookup=name, key=key, display=f"@{name}")
