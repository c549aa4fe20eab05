"""A session's file on disk and the API credentials it is opened with.

``SESSIONS_DIR/<name>.session`` is Telethon's SQLite session: it holds the account's auth key,
so the directory is 0700 and the file (and its journal) 0600, re-applied after every open and
close because SQLite recreates the journal.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet.settings import ConfigError
from worker.settings import WorkerSettings


def credentials(settings: WorkerSettings) -> tuple[int, str]:
    """``(TELEGRAM_API_ID, TELEGRAM_API_HASH)``; a readable ``ConfigError`` when missing."""
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


def protect(path: Path) -> None:
    """Mode 0600 on the session file and its SQLite journal (whichever exist)."""
    for candidate in (path, path.with_name(path.name + "-journal")):
        if candidate.exists():
            os.chmod(candidate, 0o600)
