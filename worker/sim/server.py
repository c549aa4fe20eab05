"""The simulated Telegram server of one account: answers TL requests with real TL types.

It sits where Telegram's servers would: the client's requests arrive (already through the gate,
Telethon's ``_call`` and its flood bookkeeping) as real ``telethon.tl.functions`` objects, and go
back as real TL results or as the real RPC errors ``rpc_message_to_error`` makes. In order, a
request meets: latency (``SIM_LATENCY_MS``), the hidden rate limits (:mod:`worker.sim.limits`,
only history and resolve requests), injected faults (``SIM_FAULT_RATE`` × ``SIM_FAULTS``, same
requests), then the handler. Each request can be logged as one JSON line to
``SIM_REQUEST_LOG`` (``ts``, ``session``, ``method``, ``outcome``, ``flood_wait``), appended
with ``O_APPEND`` so several processes can share one file.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from telethon.errors import rpc_message_to_error
from telethon.tl import functions, types

from worker.sim.history import _signed64, _u64
from worker.sim.horizon import Horizon
from worker.sim.limits import Limits, SimLimits
from worker.sim.world import World

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from fleet.clock import Clock
    from worker.sim.settings import SimSettings

_USERNAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{3,31}")
_WRAPPERS = (
    functions.InvokeWithoutUpdatesRequest,
    functions.InvokeWithLayerRequest,
    functions.InitConnectionRequest,
)
_FAULT_ERRORS = {
    "rpc500": (500, "INTERNAL"),
    "auth_key_unregistered": (401, "AUTH_KEY_UNREGISTERED"),
    "channel_private": (400, "CHANNEL_PRIVATE"),
    "flood_wait": (420, "FLOOD_WAIT_31"),
    "username_not_occupied": (400, "USERNAME_NOT_OCCUPIED"),
}


class _Answer(Exception):
    """An RPC error the server answers with (internal control flow)."""

    def __init__(self, code: int, message: str, outcome: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.outcome = outcome or message


def make_world(settings: SimSettings, clock: Clock) -> World:
    return World(
        seed=settings.sim_seed,
        messages_per_day=settings.sim_messages_per_day,
        empty_day_ratio=settings.sim_empty_day_ratio,
        history_start=date.fromisoformat(settings.sim_history_start),
        now=clock.now
        if settings.sim_horizon_file is None
        else Horizon(clock.now, settings.sim_horizon_file),
        moved_usernames=[n for n in settings.sim_moved_usernames.split(",") if n.strip()],
    )


def request_class(request: Any) -> str:
    if isinstance(request, functions.messages.GetHistoryRequest):
        return "history"
    if isinstance(
        request, functions.contacts.ResolveUsernameRequest | functions.channels.GetChannelsRequest
    ):
        return "resolve"
    return "other"


class SimServer:
    """What one simulated account sees of Telegram."""

    def __init__(
        self,
        settings: SimSettings,
        session_name: str,
        clock: Clock,
        *,
        world: World | None = None,
    ) -> None:
        self.settings = settings
        self.session_name = session_name
        self.clock = clock
        self.world = world or make_world(settings, clock)
        self.limits = SimLimits(Limits.from_settings(settings), clock)
        self.requests: dict[str, int] = {}  # method → count, for tests
        self.faults = [f for f in settings.sim_faults.split(",") if f]
        self.fault_rate = settings.sim_fault_rate  # public: tests turn faults on mid-run
        self._fault_rng = random.Random(_u64("faults", settings.sim_seed, session_name))
        self._latency_s = settings.sim_latency_ms / 1000.0
        self._redis: aioredis.Redis | None = None
        self._log: TextIO | None = None
        self._self_id = 700_000_000 + _u64("self", session_name) % 1_000_000_000
        self.hang_after = settings.sim_hang_after_requests  # public: tests change it mid-run
        self.served = 0
        self.history_served = 0
        self.deleted: list[int] = []  # ids deleted by SIM_DELETE_EVERY_HISTORY_REQUESTS

    async def open(self) -> None:
        settings = self.settings
        if settings.redis_url is not None and self._redis is None:
            from fleet.redisconn import connect

            self._redis = connect(settings.redis_dsn())
            self.limits = SimLimits(
                Limits.from_settings(settings),
                self.clock,
                redis=self._redis,
                key_prefix=settings.redis_key_prefix,
            )
        log_path = settings.sim_request_log
        if log_path is not None and self._log is None:
            self._log = await asyncio.to_thread(_open_log, log_path)

    async def close(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose()
        if self._log is not None:
            log, self._log = self._log, None
            log.close()

    # --- the request path ---------------------------------------------------------------------

    async def serve(self, request: Any) -> Any:
        while isinstance(request, _WRAPPERS):
            request = request.query
        method = _method_name(request)
        self.requests[method] = self.requests.get(method, 0) + 1
        self.served += 1
        if 0 <= self.hang_after < self.served:
            # A stuck DC or a black-holing proxy: the request is taken and never answered.
            self._write_log(method, "hang", 0)
            await asyncio.Event().wait()
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        cls = request_class(request)
        flood = 0
        try:
            if cls != "other":
                flood = await self.limits.check(cls)
                if flood:
                    raise _Answer(420, f"FLOOD_WAIT_{flood}", "flood")
                await self._maybe_fault(method)
            result = self._dispatch(request)
        except _Answer as answer:
            self._write_log(method, answer.outcome, flood)
            raise rpc_message_to_error(
                types.RpcError(answer.code, answer.message), request
            ) from None
        self._write_log(method, "ok", 0)
        return result

    async def _maybe_fault(self, method: str) -> None:
        if not self.faults or self.fault_rate <= 0:
            return
        if self._fault_rng.random() >= self.fault_rate:
            return
        kind = self._fault_rng.choice(self.faults)
        if kind == "timeout":
            self._write_log(method, "timeout", 0)
            await asyncio.Event().wait()  # never answered: the client's timeout fires
        code, message = _FAULT_ERRORS[kind]
        raise _Answer(code, message)

    def _write_log(self, method: str, outcome: str, flood_wait: int) -> None:
        if self._log is None:
            return
        line = {
            "ts": time.time(),
            "session": self.session_name,
            "method": method,
            "outcome": outcome,
            "flood_wait": flood_wait,
        }
        self._log.write(json.dumps(line, separators=(",", ":")) + "\n")

    # --- handlers -----------------------------------------------------------------------------

    def _dispatch(self, request: Any) -> Any:
        if isinstance(request, functions.messages.GetHistoryRequest):
            return self._history(request)
        if isinstance(request, functions.contacts.ResolveUsernameRequest):
            return self._resolve(request)
        if isinstance(request, functions.channels.GetChannelsRequest):
            return self._channels(request)
        if isinstance(request, functions.updates.GetStateRequest):
            return types.updates.State(pts=1, qts=0, date=self.clock.now(), seq=1, unread_count=0)
        if isinstance(request, functions.users.GetUsersRequest):
            return [self._user(u) for u in request.id]
        raise _Answer(400, "METHOD_NOT_SIMULATED")

    def _user(self, input_user: Any) -> Any:
        if isinstance(input_user, types.InputUserSelf):
            return types.User(
                id=self._self_id,
                is_self=True,
                access_hash=_signed64(_u64("selfhash", self._self_id)),
                first_name="Sim",
                last_name=self.session_name,
            )
        return types.UserEmpty(id=getattr(input_user, "user_id", 0))

    def _resolve(self, request: Any) -> Any:
        username = request.username
        if not _USERNAME.fullmatch(username or ""):
            raise _Answer(400, "USERNAME_INVALID")
        chat = self.world.chat_by_username(username)
        if chat is None:
            raise _Answer(400, "USERNAME_NOT_OCCUPIED")
        channel = self.world.channel(chat)
        return types.contacts.ResolvedPeer(
            peer=types.PeerChannel(chat.id), chats=[channel], users=[]
        )

    def _channels(self, request: Any) -> Any:
        chats = []
        for input_channel in request.id:
            chat = self.world.chat_by_id(getattr(input_channel, "channel_id", 0))
            if chat is None:
                raise _Answer(400, "CHANNEL_INVALID")
            chats.append(self.world.channel(chat))
        return types.messages.Chats(chats=chats)

    def _delete_while_paging(self, chat_id: int, request: Any) -> None:
        """A message of the day this request pages through is deleted (SIM_DELETE_…)."""
        day = _day_of(self.world, request)
        if day >= 0:
            self.deleted += self.world.change_day(chat_id, day, delete=1)["deleted"]

    def _history(self, request: Any) -> Any:
        peer = request.peer
        if not isinstance(peer, types.InputPeerChannel):
            raise _Answer(400, "PEER_ID_INVALID")
        world = self.world
        chat = world.chat_by_id(peer.channel_id)
        if chat is None or peer.access_hash != chat.access_hash:
            raise _Answer(400, "CHANNEL_INVALID")
        if chat.private:
            raise _Answer(400, "CHANNEL_PRIVATE")
        self.history_served += 1
        every = self.settings.sim_delete_every_history_requests
        if every and self.history_served % every == 0:
            self._delete_while_paging(chat.id, request)
        total = world.total(chat.id)
        first, last = self._window(chat.id, request, total)
        messages = world.history_slice(chat, total - last, total - first) if last > first else []
        if request.min_id or request.max_id:
            lo, hi = request.min_id or 0, request.max_id or 2**31
            messages = [m for m in messages if lo < m.id < hi]
        return types.messages.ChannelMessages(
            pts=total + 1,
            count=total,
            messages=messages,
            topics=[],
            chats=[world.channel(chat)],
            users=_senders(world.users(chat), messages),
        )

    def _window(self, chat_id: int, request: Any, total: int) -> tuple[int, int]:
        """``[first, last)`` of the page, as positions counted from the newest message (0).

        Telegram's getHistory: start at the first message older than offset_id / offset_date,
        move add_offset (negative: newer), take limit, clamp the window to the history (a
        window reaching past the newest message is cut, not shifted: Telethon's reverse paging
        stops at the first id it has already seen, so a shifted window would lose the newest
        messages); the caller then drops what is outside (min_id, max_id).
        """
        world = self.world
        if request.offset_id:
            start = total - world.count_id_below(chat_id, request.offset_id)
        elif request.offset_date and not self.settings.sim_ignore_offset_date:
            start = total - world.count_date_below(chat_id, _unix(request.offset_date))
        else:
            start = 0
        limit = max(0, min(request.limit or 0, 100))
        first = start + (request.add_offset or 0)
        if first < 0 and self.settings.sim_shifted_window:
            # The hostile shape: the window is moved back inside the history, so the page holds
            # the newer messages *and* older ones already seen (SIM_SHIFTED_WINDOW).
            first = 0
        last = min(total, first + limit)
        return max(0, first), last


def _senders(users: list[types.User], messages: list[Any]) -> list[types.User]:
    """The users who sent the page's messages (a real answer carries exactly those)."""
    users_by_id = {u.id: u for u in users}
    wanted: dict[int, Any] = {}
    for m in messages:
        from_id = m.from_id
        if isinstance(from_id, types.PeerUser) and from_id.user_id in users_by_id:
            wanted[from_id.user_id] = users_by_id[from_id.user_id]
    return list(wanted.values())


def _day_of(world: World, request: Any) -> int:
    if request.offset_id:
        return world.day_index(request.offset_id)
    if request.offset_date:
        return (_unix(request.offset_date) - world.start_ts) // 86_400
    return (world.now_ts() - world.start_ts) // 86_400


def _open_log(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered append: each request is one write() of one line, whole even when several
    # processes append to the same file (O_APPEND).
    return open(path, "a", buffering=1, encoding="utf-8")


def _method_name(request: Any) -> str:
    module = type(request).__module__.rsplit(".", 1)[-1]
    name = type(request).__name__.removesuffix("Request")
    return name if module == "functions" else f"{module}.{name}"


def _unix(moment: datetime) -> int:
    if moment.tzinfo is None:  # TL serialises naive datetimes as UTC
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
