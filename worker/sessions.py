"""Session leases: one worker process per Telegram session, one session per worker process.

A Telethon session file used by two processes at once breaks (``database is locked``,
``AUTH_KEY_DUPLICATED``), so a worker holds its session through a Redis lease
``session-lease:<name>`` (random token, PX TTL ``SESSION_LEASE_SECONDS``, refreshed by the
worker's heartbeat, deleted on exit). Which sessions a worker may take:

- ``TELEGRAM_SESSION`` if set (the worker is pinned to it and waits while another holds it);
- otherwise every ``*.session`` file in ``SESSIONS_DIR``, first free one wins, so
  ``docker compose up --scale worker=3`` over one shared ``sessions/`` volume gives three
  workers on three sessions and a fourth replica waits (and logs why) instead of sharing;
- with ``TELEGRAM_BACKEND=sim`` the names in ``SIM_SESSIONS`` (virtual: no file), else the
  session files, else the single virtual session ``sim``.

A session Telegram revoked is recorded in the hash ``sessions-bad`` (reason, time, worker,
file mtime) and skipped by every worker until its file is replaced (a new ``login`` gives it a
newer mtime, which clears the mark) or an operator clears it (``python -m worker status
--clear-bad NAME``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from fleet.clock import utc_iso
from fleet.keys import Keys, check_session
from fleet.redisconn import RedisLink
from fleet.scripts import scripts_for, text
from worker.errors import SessionRevoked
from worker.settings import WorkerSettings


@dataclass(frozen=True)
class BadMark:
    reason: str
    ts: str
    worker_id: str | None
    file_mtime: float | None

    @classmethod
    def parse(cls, raw: Any) -> BadMark:
        try:
            data = json.loads(raw)
        except (ValueError, TypeError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        mtime = data.get("file_mtime")
        return cls(
            reason=str(data.get("reason", "?")),
            ts=str(data.get("ts", "?")),
            worker_id=data.get("worker_id") if isinstance(data.get("worker_id"), str) else None,
            file_mtime=float(mtime) if isinstance(mtime, int | float) else None,
        )


_OWN_TOKENS: set[str] = set()  # every lease token this process made


def lease_token() -> str:
    """A lease token: random, then ``|host:pid`` of the process holding the lease."""
    token = f"{uuid.uuid4().hex}|{socket.gethostname()}:{os.getpid()}"
    _OWN_TOKENS.add(token)
    return token


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    try:  # a zombie (killed, not yet reaped by its parent) is dead for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_is_dead(token: str | None, own_token: str) -> bool:
    """Is the process that holds a lease under ``token`` provably dead? Only for a holder on
    this host (same hostname): its pid no longer runs, or it is our own pid (a container
    restarted under the same hostname reuses small pids) under a token this process never
    made. Anything else (another host, an unparsable token, a live pid) is not provably dead:
    wait for the TTL."""
    if not token or token == own_token or token in _OWN_TOKENS:
        return False
    _, sep, where = token.rpartition("|")
    host, colon, pid_text = where.rpartition(":")
    if not sep or not colon or host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid == os.getpid() or not _pid_alive(pid)


async def take_over_dead_holder(client: Redis, key: str, own_token: str) -> str | None:
    """Delete the lease ``key`` if its holder is provably dead (compare-and-delete, so a
    lease renewed or re-taken meanwhile is left alone); the dead token, or ``None``."""
    found = await client.get(key)
    token = None if found is None else text(found)
    if token is None or not holder_is_dead(token, own_token):
        return None
    if int(await scripts_for(client).unlease(keys=[key], args=[token])) != 1:
        return None
    return token


class SessionLeases:
    """Claims, refreshes and releases this worker's session lease."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        settings: WorkerSettings,
        *,
        link: RedisLink | None = None,
        fixed_names: tuple[str, ...] | None = None,
    ) -> None:
        self.client = client
        self.fixed_names = fixed_names  # a simulated backend's names instead of session files
        self.keys = keys
        self.settings = settings
        self.link = link
        # The part after '|' tells `status` who holds a session, and a restarted worker on
        # the same host that its holder is dead (see holder_is_dead).
        self.token = lease_token()
        self.ttl_ms = int(settings.session_lease_seconds * 1000)
        self.name: str | None = None
        self.scripts = scripts_for(client)
        self._last_reason = ""

    # --- which sessions ----------------------------------------------------------------------
    def candidates(self) -> list[str]:
        s = self.settings
        if s.telegram_session:
            return [s.telegram_session]
        if self.fixed_names:
            return [check_session(n) for n in self.fixed_names]
        files = sorted(p.stem for p in s.sessions_dir.glob("*.session") if p.is_file())
        names = []
        for name in files:
            try:
                names.append(check_session(name))
            except ValueError:
                logger.warning("ignoring session file with an unusable name: {}.session", name)
        return names

    def _file_mtime(self, name: str) -> float | None:
        path = self.settings.sessions_dir / f"{name}.session"
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    async def bad_sessions(self) -> dict[str, BadMark]:
        """Sessions marked bad whose mark still stands (the file was not renewed since)."""
        marks = await self._call(lambda: self.client.hgetall(self.keys.sessions_bad))
        out: dict[str, BadMark] = {}
        for raw_name, raw_mark in marks.items():
            name, mark = text(raw_name), BadMark.parse(raw_mark)
            mtime = self._file_mtime(name)
            if mtime is not None and mark.file_mtime is not None and mtime > mark.file_mtime:
                logger.info("session {} was renewed since it was marked bad; clearing", name)
                await self._call(lambda n=name: self.client.hdel(self.keys.sessions_bad, n))
                continue
            out[name] = mark
        return out

    # --- lease ------------------------------------------------------------------------------
    async def claim(
        self, stop: asyncio.Event, on_wait: Callable[[], None] | None = None
    ) -> str | None:
        """Hold a free session and return its name; wait politely (logging why, once per
        change) while none is free, calling ``on_wait`` every round (the daemon refreshes its
        health file); ``None`` if ``stop`` is set first. ``SessionRevoked`` if the pinned
        ``TELEGRAM_SESSION`` is marked bad. A session held by a provably dead process on this
        host (a worker killed and restarted) is taken over at once, not after its TTL."""
        while not stop.is_set():
            if on_wait is not None:
                on_wait()
            names = self.candidates()
            bad = await self.bad_sessions()
            pinned = self.settings.telegram_session
            if pinned and pinned in bad:
                mark = bad[pinned]
                raise SessionRevoked(
                    f"session {pinned!r} is marked bad since {mark.ts}: {mark.reason}; log in "
                    f"again (`python -m worker login --session {pinned}`)"
                )
            held_by_others = []
            for name in names:
                if name in bad:
                    continue
                got = await self._call(
                    lambda n=name: self.scripts.lease(
                        keys=[self.keys.session_lease(n)], args=[self.token, self.ttl_ms]
                    )
                )
                if int(got) == 0:
                    dead = await self._call(
                        lambda n=name: take_over_dead_holder(
                            self.client, self.keys.session_lease(n), self.token
                        )
                    )
                    if dead is not None:
                        logger.warning(
                            "session {} was held by a dead process ({}); taking it over",
                            name,
                            dead.rpartition("|")[2],
                        )
                        got = await self._call(
                            lambda n=name: self.scripts.lease(
                                keys=[self.keys.session_lease(n)], args=[self.token, self.ttl_ms]
                            )
                        )
                if int(got) in (1, 2):
                    self.name = name
                    logger.info("holding telegram session {}", name)
                    self._last_reason = ""
                    return name
                held_by_others.append(name)
            self._explain(names, bad, held_by_others)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.session_wait_seconds)
        return None

    def _explain(self, names: list[str], bad: dict[str, BadMark], held: list[str]) -> None:
        if not names:
            reason = (
                f"no session in {self.settings.sessions_dir} (create one with "
                "`python -m worker login --session NAME`)"
            )
        else:
            parts = []
            if held:
                parts.append(f"{len(held)} in use by other workers ({', '.join(held)})")
            marked = [n for n in names if n in bad]
            if marked:
                parts.append(
                    f"{len(marked)} marked bad ("
                    + ", ".join(f"{n}: {bad[n].reason}" for n in marked)
                    + ")"
                )
            reason = f"no free telegram session among {len(names)}: " + "; ".join(parts)
        if reason != self._last_reason:
            self._last_reason = reason
            logger.warning(
                "{}; waiting (checking every {:g}s)", reason, self.settings.session_wait_seconds
            )

    async def refresh(self) -> bool:
        """Extend the lease; ``False`` if another process holds the session now (ours expired
        during an outage and was claimed): the caller must stop using it."""
        if self.name is None:
            return True
        got = int(
            await self.scripts.lease(
                keys=[self.keys.session_lease(self.name)], args=[self.token, self.ttl_ms]
            )
        )
        if got == 2:
            logger.warning("session lease {} had expired; re-claimed it", self.name)
        return got in (1, 2)

    async def release(self) -> None:
        if self.name is not None:
            await self.scripts.unlease(keys=[self.keys.session_lease(self.name)], args=[self.token])
            logger.info("released telegram session {}", self.name)

    async def mark_bad(self, reason: str, worker_id: str | None) -> None:
        """Record that Telegram revoked the held session; every worker skips it from now."""
        if self.name is None:
            return
        mark = {
            "reason": reason[:500],
            "ts": utc_iso(datetime.now(UTC)),
            "worker_id": worker_id,
            "file_mtime": self._file_mtime(self.name),
        }
        await self.client.hset(self.keys.sessions_bad, self.name, json.dumps(mark))
        logger.error("session {} marked bad: {}", self.name, reason)

    async def _call(self, op: Any) -> Any:
        if self.link is None:
            return await op()
        return await self.link.call(op, "session lease")
