"""The simulator's world and its getHistory semantics, without a client."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from telethon import errors
from telethon.tl import functions, types

from fleet.clock import FakeClock
from worker.sim.limits import Limits, SlidingWindow
from worker.sim.server import SimServer
from worker.sim.world import DAY_S, STRIDE, World

NOW = datetime(2025, 11, 9, 12, 0, tzinfo=UTC)


def make_world(**kw: Any) -> World:
    args: dict[str, Any] = {
        "seed": 1,
        "messages_per_day": 300,
        "empty_day_ratio": 0.1,
        "history_start": date(2025, 1, 1),
        "now": lambda: NOW,
    }
    args.update(kw)
    return World(**args)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def test_history_is_deterministic_per_seed_and_chat() -> None:
    a, b = make_world(), make_world()
    chat = a.chat_by_username("ru_python")
    assert chat is not None
    start, end = day_bounds(date(2025, 6, 1))
    assert a.messages_between(chat.id, start, end) == b.messages_between(chat.id, start, end)
    other = make_world(seed=2)
    assert other.messages_between(chat.id, start, end) != a.messages_between(chat.id, start, end)
    assert a.chat_by_username("RU_PYTHON") == chat  # usernames are case-insensitive


def test_ids_increase_with_time_have_gaps_and_fit_int32() -> None:
    world = make_world(messages_per_day=2000, empty_day_ratio=0.0)
    chat = world.chat_by_username("bigchat")
    assert chat is not None
    rows = world.messages_between(chat.id, world.start, NOW)
    ids = [i for i, _ in rows]
    times = [t for _, t in rows]
    assert ids == sorted(set(ids))
    assert times == sorted(times)
    assert ids[-1] < 2**31
    assert any(b - a > 1 for a, b in itertools.pairwise(ids))  # some deleted ids
    for msg_id, ts in rows[:: max(1, len(rows) // 500)]:
        assert (msg_id - 1) // STRIDE == (ts - world.start_ts) // DAY_S  # id slot = its day


def test_dates_spread_within_the_day_and_counts_vary_around_the_setting() -> None:
    world = make_world(messages_per_day=1000, empty_day_ratio=0.0)
    chat = world.chat_by_username("spread")
    assert chat is not None
    counts = []
    for offset in range(20):
        start, end = day_bounds(date(2025, 3, 1) + timedelta(days=offset))
        rows = world.messages_between(chat.id, start, end)
        counts.append(len(rows))
        hours = {(ts - int(start.timestamp())) // 3600 for _, ts in rows}
        assert len(hours) >= 20
    assert min(counts) >= 600 and max(counts) <= 1400 and len(set(counts)) > 5


def test_empty_day_ratio_makes_some_days_empty() -> None:
    world = make_world(empty_day_ratio=0.5)
    chat = world.chat_by_username("quiet")
    assert chat is not None
    empty = sum(world.day_count(chat.id, d) == 0 for d in range(200))
    assert 60 <= empty <= 140


def test_nothing_after_now_is_visible() -> None:
    now = [datetime(2025, 11, 9, 12, 0, tzinfo=UTC)]
    world = make_world(empty_day_ratio=0.0, now=lambda: now[0])
    chat = world.chat_by_username("live")
    assert chat is not None
    day_start, day_end = day_bounds(date(2025, 11, 9))
    visible = world.messages_between(chat.id, day_start, day_end)
    assert visible and all(ts <= now[0].timestamp() for _, ts in visible)
    now[0] += timedelta(hours=6)
    later = world.messages_between(chat.id, day_start, day_end)
    assert later[: len(visible)] == visible and len(later) > len(visible)


def test_built_messages_look_like_a_real_supergroup() -> None:
    world = make_world(messages_per_day=3000, empty_day_ratio=0.0)
    chat = world.chat_by_username("rich")
    assert chat is not None
    total = world.total(chat.id)
    msgs = world.history_slice(chat, total - 3000, total)
    assert [m.id for m in msgs] == sorted((m.id for m in msgs), reverse=True)
    plain = [m for m in msgs if isinstance(m, types.Message)]
    service = [m for m in msgs if isinstance(m, types.MessageService)]
    assert service
    assert any(m.reply_to for m in plain)
    assert any(m.edit_date for m in plain)
    assert any(m.media for m in plain)
    assert any(m.reactions for m in plain)
    assert any(m.replies for m in plain)
    assert any(m.fwd_from for m in plain)
    kinds = {type(e).__name__ for m in plain for e in (m.entities or [])}
    assert {"MessageEntityUrl", "MessageEntityBold"} <= kinds
    ids = {m.id for m in msgs}
    for m in plain:
        if m.entities:
            for e in m.entities:
                assert e.offset >= 0 and e.offset + e.length <= len(m.message)
        if m.reply_to and m.reply_to.reply_to_msg_id > min(ids):
            assert m.reply_to.reply_to_msg_id in ids  # replies point at existing messages
            assert m.reply_to.reply_to_msg_id < m.id


def test_special_names() -> None:
    world = make_world()
    assert world.chat_by_username("missing_chat") is None
    assert world.chat_by_username("nonexistent") is None
    private = world.chat_by_username("private_club")
    assert private is not None and private.private
    assert world.chat_by_id(999) is None
    synthetic = world.chat_by_id(1_234_567)
    assert synthetic is not None and synthetic.id == 1_234_567


def test_sliding_window_refuses_the_one_over_the_limit_until_a_slot_frees() -> None:
    window = SlidingWindow()
    assert [window.admit(float(t), 3, 30.0) for t in (0, 1, 2)] == [0, 0, 0]
    assert window.admit(5.0, 3, 30.0) == 25  # the slot of t=0 frees at t=30
    assert window.admit(29.5, 3, 30.0) == 1  # at least 1
    assert window.admit(30.0, 3, 30.0) == 0
    assert window.admit(30.0, 0, 30.0) == 0  # 0 disables


def test_limits_override_from_a_hash_ignores_bad_values() -> None:
    base = Limits()
    new = base.overridden({"fleet_requests": "7", "history_window_seconds": "oops", "x": "1"})
    assert new.fleet_requests == 7 and new.history_window_seconds == base.history_window_seconds


# --- getHistory semantics through the server --------------------------------------------------


@pytest.fixture
def server(clean_env: object) -> SimServer:
    from worker.sim.settings import SimSettings

    settings = SimSettings(
        telegram_backend="sim",
        sim_messages_per_day=250,
        sim_empty_day_ratio=0.2,
        sim_history_start="2025-10-01",
        sim_history_requests=0,
        sim_resolve_requests=0,
    )
    return SimServer(settings, "acct", FakeClock(NOW))


def _peer(server: SimServer, name: str = "history_chat") -> types.InputPeerChannel:
    chat = server.world.chat_by_username(name)
    assert chat is not None
    return types.InputPeerChannel(chat.id, chat.access_hash)


def _all_ids(server: SimServer, name: str = "history_chat") -> list[int]:
    chat = server.world.chat_by_username(name)
    assert chat is not None
    return [i for i, _ in server.world.messages_between(chat.id, server.world.start, NOW)]


History = Callable[..., Any]


@pytest.fixture
def history(server: SimServer) -> History:
    async def call(**kw: Any) -> list[int]:
        args: dict[str, Any] = {
            "peer": _peer(server),
            "offset_id": 0,
            "offset_date": None,
            "add_offset": 0,
            "limit": 100,
            "max_id": 0,
            "min_id": 0,
            "hash": 0,
        }
        args.update(kw)
        result = await server.serve(functions.messages.GetHistoryRequest(**args))
        assert isinstance(result, types.messages.ChannelMessages)
        return [m.id for m in result.messages]

    return call


async def test_history_without_offsets_returns_the_newest_first(
    server: SimServer, history: History
) -> None:
    ids = _all_ids(server)
    assert await history(limit=100) == ids[::-1][:100]
    assert await history(limit=500) == ids[::-1][:100]  # a page is at most 100


async def test_offset_id_starts_below_it_and_add_offset_moves_to_newer(
    server: SimServer, history: History
) -> None:
    ids = _all_ids(server)
    pivot = ids[1000]
    assert await history(offset_id=pivot, limit=10) == ids[990:1000][::-1]
    # Telethon's reverse paging (offset_id = last + 1, add_offset = -limit): the next ten
    assert await history(offset_id=pivot + 1, add_offset=-10, limit=10) == ids[1001:1011][::-1]
    # a window reaching past the newest message is cut there (only the newer ones come back)
    assert await history(offset_id=ids[-3], add_offset=-100, limit=100) == ids[-3:][::-1]
    assert await history(offset_id=ids[-3], add_offset=-4, limit=3) == [ids[-1], ids[-2]]


async def test_offset_date_and_min_max_filters(server: SimServer, history: History) -> None:
    chat = server.world.chat_by_username("history_chat")
    assert chat is not None
    for offset in range(30):  # the first non-empty day from 2025-10-20
        start, end = day_bounds(date(2025, 10, 20) + timedelta(days=offset))
        day = server.world.messages_between(chat.id, start, end)
        if day:
            break
    before = server.world.messages_between(chat.id, server.world.start, start)
    got = await history(offset_date=start, limit=5)
    assert got == [i for i, _ in before][::-1][:5]
    got = await history(offset_date=start, add_offset=-5, limit=5)
    assert got == [i for i, _ in day][:5][::-1]
    first, last = day[0][0], day[-1][0]
    got = await history(offset_date=end, limit=100, min_id=first, max_id=last)
    assert all(first < i < last for i in got) and got


async def test_private_and_unknown_chats_fail_like_telegram(server: SimServer) -> None:
    req = functions.messages.GetHistoryRequest(
        peer=_peer(server, "private_stuff"),
        offset_id=0,
        offset_date=None,
        add_offset=0,
        limit=10,
        max_id=0,
        min_id=0,
        hash=0,
    )
    with pytest.raises(errors.ChannelPrivateError):
        await server.serve(req)
    with pytest.raises(errors.UsernameNotOccupiedError):
        await server.serve(functions.contacts.ResolveUsernameRequest(username="missing_one"))
    with pytest.raises(errors.ChannelInvalidError):
        await server.serve(functions.channels.GetChannelsRequest(id=[types.InputChannel(999, 0)]))
    resolved = await server.serve(functions.contacts.ResolveUsernameRequest(username="Good_Chat"))
    assert isinstance(resolved.chats[0], types.Channel) and resolved.chats[0].megagroup


def test_a_horizon_file_makes_messages_appear_at_runtime(tmp_path: Path) -> None:
    """Issue 14: raising SIM_HORIZON_FILE appends exactly the history up to the new time."""
    import os

    from worker.sim.horizon import Horizon

    real = datetime(2024, 1, 5, 12, 0, tzinfo=UTC)
    path = tmp_path / "horizon"

    def set_horizon(moment: datetime) -> None:
        (tmp_path / "h.tmp").write_text(str(moment.timestamp()))
        os.replace(tmp_path / "h.tmp", path)

    w = World(
        seed=1,
        messages_per_day=500,
        empty_day_ratio=0.0,
        history_start=date(2024, 1, 1),
        now=Horizon(lambda: real, path),
    )
    chat = w.chat_by_username("horizon_chat")
    assert chat is not None
    everything = w.total(chat.id)  # no file yet: the real clock
    set_horizon(real - timedelta(hours=6))
    seen = w.messages_between(chat.id, real - timedelta(days=9), real)
    assert max(ts for _, ts in seen) < (real - timedelta(hours=6)).timestamp()
    earlier = w.total(chat.id)
    set_horizon(real - timedelta(hours=1))
    later = w.total(chat.id)
    assert earlier < later < everything
    appended = w.messages_between(chat.id, real - timedelta(days=9), real)[len(seen) :]
    assert appended and min(i for i, _ in appended) > max(i for i, _ in seen)
    set_horizon(real + timedelta(days=1))
    assert w.total(chat.id) == everything  # never beyond the real clock
