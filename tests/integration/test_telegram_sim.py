"""TelegramSession through the real Telethon client, with the simulator below it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from telethon import utils

from fleet.chats import parse_chat
from fleet.clock import FakeClock
from fleet.gate import Outcome, RequestClass
from worker.backend import backend_for
from worker.errors import PermanentError, RateLimited, SessionRevoked, TransientError
from worker.settings import WorkerSettings
from worker.sim.client import sim_client_factory
from worker.sim.settings import SimSettings
from worker.telegram import FetchedMessage, ResolvedChat, TelegramSession

NOW = datetime(2025, 11, 9, 12, 0, tzinfo=UTC)
HISTORY = "messages.GetHistory"
RESOLVE = "contacts.ResolveUsername"


class RecordingGate:
    def __init__(self) -> None:
        self.acquired: list[RequestClass] = []
        self.reports: list[tuple[RequestClass, Outcome, float]] = []

    async def acquire(self, request_class: RequestClass) -> None:
        self.acquired.append(request_class)

    async def report(
        self, request_class: RequestClass, outcome: Outcome, *, flood_wait_s: float = 0.0
    ) -> None:
        self.reports.append((request_class, outcome, flood_wait_s))

    async def aclose(self) -> None:
        return None


SessionFactory = Callable[..., Any]


@pytest.fixture
async def make_session(clean_env: object) -> AsyncIterator[SessionFactory]:
    opened: list[TelegramSession] = []

    async def factory(
        name: str = "acct1",
        *,
        clock: FakeClock | None = None,
        gate: RecordingGate | None = None,
        **overrides: Any,
    ) -> TelegramSession:
        values: dict[str, Any] = {
            "telegram_backend": "sim",
            "sim_history_start": "2025-09-01",
            "sim_messages_per_day": 300,
            "sim_empty_day_ratio": 0.1,
            "sim_history_requests": 0,
            "sim_resolve_requests": 0,
            "retry_max_attempts": 3,
        }
        values.update(overrides)
        settings = SimSettings(**values)
        session = TelegramSession(
            settings,
            name,
            gate=gate,
            clock=clock or FakeClock(NOW),
            client_factory=sim_client_factory(settings),
        )
        await session.connect()
        opened.append(session)
        return session

    yield factory
    for session in opened:
        await session.close()


def bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def truth(
    session: TelegramSession, chat: ResolvedChat, start: datetime, end: datetime
) -> list[int]:
    world = session.client.sim.world
    bare, _ = utils.resolve_id(chat.peer_id)
    return [i for i, _ in world.messages_between(bare, start, end)]


async def collect(
    session: TelegramSession, chat: ResolvedChat, start: datetime, end: datetime, after_id: int = 0
) -> list[list[FetchedMessage]]:
    return [page async for page in session.iter_history(chat, start, end, after_id=after_id)]


def requests(session: TelegramSession, method: str) -> int:
    return session.client.sim.requests.get(method, 0)


async def test_a_day_pages_in_ascending_order_exactly_as_the_world_has_it(
    make_session: SessionFactory,
) -> None:
    session = await make_session(sim_messages_per_day=2000)
    chat = await session.resolve(parse_chat("@ru_python"))
    start, end = bounds(date(2025, 11, 7))
    pages = await collect(session, chat, start, end)
    got = [m for page in pages for m in page]
    expected = truth(session, chat, start, end)
    assert len(expected) > 1000
    assert [m.id for m in got] == expected
    assert all(1 <= len(p) <= 100 for p in pages)
    assert all(start <= m.date < end for m in got)
    assert all(m.data["chat"] == "@ru_python" and m.data["id"] == m.id for m in got)
    assert [m.data["date"] for m in got] == [m.date.strftime("%Y-%m-%dT%H:%M:%SZ") for m in got]


async def test_resume_after_id_yields_only_newer_messages(make_session: SessionFactory) -> None:
    session = await make_session()
    chat = await session.resolve(parse_chat("@resume_chat"))
    start, end = bounds(date(2025, 11, 3))
    expected = truth(session, chat, start, end)
    assert len(expected) > 150
    after = expected[120]
    got = [m.id for page in await collect(session, chat, start, end, after_id=after) for m in page]
    assert got == expected[121:]


async def test_an_empty_day_yields_nothing(make_session: SessionFactory) -> None:
    session = await make_session(sim_empty_day_ratio=0.5)
    chat = await session.resolve(parse_chat("@sleepy_chat"))
    for offset in range(60):
        start, end = bounds(date(2025, 10, 1) + timedelta(days=offset))
        if not truth(session, chat, start, end):
            break
    else:
        pytest.fail("no empty day found")
    assert await collect(session, chat, start, end) == []


async def test_today_stops_at_now(make_session: SessionFactory) -> None:
    session = await make_session()
    chat = await session.resolve(parse_chat("@live_chat"))
    start, end = bounds(NOW.date())
    got = [m for page in await collect(session, chat, start, end) for m in page]
    assert got and all(m.date <= NOW for m in got)
    assert [m.id for m in got] == truth(session, chat, start, end)


async def test_resolve_is_cached_per_session(make_session: SessionFactory) -> None:
    session = await make_session()
    first = await session.resolve(parse_chat("@cached_chat"))
    again = await session.resolve(parse_chat("https://t.me/Cached_Chat"))
    assert again == first
    assert requests(session, RESOLVE) == 1
    assert first.title and first.username == "cached_chat"
    assert first.peer_id < -1_000_000_000_000  # a -100… supergroup id


async def test_numeric_ids_resolve_through_get_channels(make_session: SessionFactory) -> None:
    session = await make_session()
    by_name = await session.resolve(parse_chat("@numbered_chat"))
    fresh = await make_session("acct2")
    by_id = await fresh.resolve(parse_chat(str(by_name.peer_id)))
    assert by_id.peer_id == by_name.peer_id
    assert requests(fresh, "channels.GetChannels") == 1
    start, end = bounds(date(2025, 11, 1))
    a = [m.id for p in await collect(session, by_name, start, end) for m in p]
    b = [m.id for p in await collect(fresh, by_id, start, end) for m in p]
    assert a == b
    # The session that already knows the chat needs no request at all.
    again = await session.resolve(parse_chat(str(by_name.peer_id)))
    assert again.peer_id == by_name.peer_id
    assert requests(session, "channels.GetChannels") == 0


async def test_unknown_numeric_id_is_permanent_with_a_hint(make_session: SessionFactory) -> None:
    session = await make_session()
    with pytest.raises(PermanentError, match="@username"):
        await session.resolve(parse_chat("-1000000000999"))
    basic = await session.resolve(parse_chat("-100999"))  # a basic group: no lookup possible
    start, end = bounds(date(2025, 11, 1))
    with pytest.raises(PermanentError):
        await collect(session, basic, start, end)


async def test_missing_and_private_chats_are_permanent(make_session: SessionFactory) -> None:
    gate = RecordingGate()
    session = await make_session(gate=gate)
    with pytest.raises(PermanentError, match="@missing_chat"):
        await session.resolve(parse_chat("@missing_chat"))
    private = await session.resolve(parse_chat("@private_club"))
    start, end = bounds(date(2025, 11, 1))
    with pytest.raises(PermanentError, match="private"):
        await collect(session, private, start, end)
    assert ("history", "ok", 0.0) in gate.reports  # not a health signal for the breaker


async def test_flood_wait_under_the_cap_is_slept_out_and_paging_goes_on(
    make_session: SessionFactory,
) -> None:
    clock = FakeClock(NOW)
    gate = RecordingGate()
    session = await make_session(
        clock=clock,
        gate=gate,
        sim_messages_per_day=1500,
        sim_empty_day_ratio=0.0,
        sim_history_requests=4,
        sim_history_window_seconds=30,
        flood_wait_max_seconds=60,
    )
    chat = await session.resolve(parse_chat("@busy_chat"))
    start, end = bounds(date(2025, 11, 5))
    expected = truth(session, chat, start, end)
    began = time.monotonic()
    got = [m.id for page in await collect(session, chat, start, end) for m in page]
    assert time.monotonic() - began < 5  # nothing slept for real
    assert got == expected
    floods = [r for r in gate.reports if r[1] == "flood"]
    assert floods and all(r[0] == "history" and r[2] == 30 for r in floods)
    assert len(clock.sleeps) == len(floods)
    assert all(30.0 <= s <= 30.1 for s in clock.sleeps)  # N + FLOOD_WAIT_JITTER_SECONDS
    # No restart from page one: every page was asked once, plus one refused ask per flood.
    answered = gate.reports.count(("history", "ok", 0.0))
    assert requests(session, HISTORY) == answered + len(floods)
    assert answered <= len(expected) // 100 + 3


async def test_flood_wait_over_the_cap_raises_rate_limited(make_session: SessionFactory) -> None:
    clock = FakeClock(NOW)
    session = await make_session(
        clock=clock,
        sim_history_requests=2,
        sim_history_window_seconds=45,
        flood_wait_max_seconds=10,
        sim_messages_per_day=1000,
        sim_empty_day_ratio=0.0,
    )
    chat = await session.resolve(parse_chat("@busy_chat"))
    start, end = bounds(date(2025, 11, 5))
    with pytest.raises(RateLimited) as info:
        await collect(session, chat, start, end)
    assert info.value.retry_after == 45
    assert info.value.request_class == "history"
    assert requests(session, HISTORY) == 3  # two answered, the third refused, none re-sent
    # Asking again inside the wait is refused locally, without a request.
    with pytest.raises(RateLimited) as again:
        await collect(session, chat, start, end)
    assert again.value.retry_after == 45
    assert requests(session, HISTORY) == 3
    # Once the (injected) clock has moved past the wait, requests go out again.
    clock.advance(45)
    async for page in session.iter_history(chat, start, end):
        assert [m.id for m in page] == truth(session, chat, start, end)[:100]
        break
    assert requests(session, HISTORY) == 4


async def test_per_account_limit_31st_history_request_gets_flood_wait(
    make_session: SessionFactory,
) -> None:
    clock = FakeClock(NOW)
    session = await make_session(
        clock=clock,
        sim_history_requests=30,
        flood_wait_max_seconds=0,
        sim_messages_per_day=400,
        sim_empty_day_ratio=0.0,
    )
    chat = await session.resolve(parse_chat("@limit_chat"))
    day = date(2025, 10, 1)
    sent = 0
    with pytest.raises(RateLimited) as info:
        while True:  # one page per day: each call costs one or two getHistory requests
            start, end = bounds(day)
            async for _ in session.iter_history(chat, start, end):
                break
            day += timedelta(days=1)
            sent = requests(session, HISTORY)
    assert sent == 30
    assert info.value.retry_after == 30
    clock.advance(30)
    start, end = bounds(day)
    assert await collect(session, chat, start, start + timedelta(hours=1))


@pytest.mark.parametrize(
    ("fault", "error", "outcome"),
    [
        ("rpc500", TransientError, "transient"),
        ("timeout", TransientError, "transient"),
        ("auth_key_unregistered", SessionRevoked, "fatal"),
        ("channel_private", PermanentError, "ok"),
    ],
)
async def test_injected_faults_are_translated(
    make_session: SessionFactory, fault: str, error: type[Exception], outcome: str
) -> None:
    clock = FakeClock(NOW)
    gate = RecordingGate()
    session = await make_session(
        clock=clock,
        gate=gate,
        sim_faults=fault,
        sim_fault_rate=0.0,
        telegram_request_timeout_seconds=0.05,
    )
    chat = await session.resolve(parse_chat("@faulty_chat"))
    session.client.sim.fault_rate = 1.0
    start, end = bounds(date(2025, 11, 1))
    with pytest.raises(error):
        await collect(session, chat, start, end)
    history_reports = [r[1] for r in gate.reports if r[0] == "history"]
    assert history_reports and set(history_reports) == {outcome}
    retried = fault in ("rpc500", "timeout")
    assert len(history_reports) == (3 if retried else 1)  # RETRY_MAX_ATTEMPTS=3
    assert len(clock.sleeps) == (2 if retried else 0)  # backoff on the injected clock


async def test_transient_faults_recover_within_the_retry_budget(
    make_session: SessionFactory,
) -> None:
    session = await make_session(
        sim_faults="rpc500", sim_fault_rate=0.2, retry_max_attempts=8, sim_seed=3
    )
    chat = await session.resolve(parse_chat("@wobbly_chat"))
    start, end = bounds(date(2025, 11, 2))
    got = [m.id for p in await collect(session, chat, start, end) for m in p]
    assert got == truth(session, chat, start, end)


async def test_gate_is_asked_before_every_request(make_session: SessionFactory) -> None:
    gate = RecordingGate()
    session = await make_session(gate=gate)
    chat = await session.resolve(parse_chat("@gated_chat"))
    start, end = bounds(date(2025, 11, 2))
    await collect(session, chat, start, end)
    sim = session.client.sim
    assert gate.acquired.count("history") == sim.requests[HISTORY]
    assert gate.acquired.count("resolve") == sim.requests[RESOLVE] == 1
    assert len(gate.acquired) == sum(sim.requests.values())


async def test_close_is_idempotent_and_not_connected_is_transient(
    make_session: SessionFactory,
) -> None:
    session = await make_session()
    await session.close()
    await session.close()
    with pytest.raises(TransientError):
        await session.resolve(parse_chat("@after_close"))


async def test_telethon_backend_needs_credentials(clean_env: object) -> None:
    from fleet.settings import ConfigError

    session = TelegramSession(WorkerSettings(telegram_backend="telethon"), "real")
    with pytest.raises(ConfigError, match="TELEGRAM_API_ID"):
        await session.connect()


async def test_telethon_backend_without_session_file_is_revoked(clean_env: Any) -> None:
    settings = WorkerSettings(
        telegram_backend="telethon",
        telegram_api_id=1,
        telegram_api_hash="0123456789abcdef",
        sessions_dir=clean_env / "sessions",
    )
    with pytest.raises(SessionRevoked, match="login --session real"):
        await TelegramSession(settings, "real").connect()
    assert (clean_env / "sessions").stat().st_mode & 0o777 == 0o700


async def test_login_on_the_simulator_needs_no_prompt(clean_env: object) -> None:

    def never(prompt: str) -> str:
        raise AssertionError(f"prompted: {prompt}")

    settings = WorkerSettings(telegram_backend="sim")
    assert backend_for(settings).login_name("acct1") == "Sim acct1"


async def test_login_on_telethon_needs_credentials(clean_env: object) -> None:
    from fleet.settings import ConfigError
    from worker.login import login

    with pytest.raises(ConfigError, match="TELEGRAM_API_HASH"):
        await login(WorkerSettings(), "acct1", ask=input, ask_secret=input)


@pytest.mark.parametrize(
    ("fault", "error", "name", "label"),
    [
        ("flood_wait", RateLimited, "FLOOD_WAIT_31", ("rate_limit", "FLOOD_WAIT")),
        ("username_not_occupied", PermanentError, "USERNAME_NOT_OCCUPIED", None),
        ("auth_key_unregistered", SessionRevoked, "AUTH_KEY_UNREGISTERED", None),
        ("rpc500", TransientError, "INTERNAL", ("retry", "INTERNAL")),
    ],
)
async def test_real_error_names_reach_the_error_and_the_metrics_labels(
    clean_env: object,
    fault: str,
    error: type[Exception],
    name: str,
    label: tuple[str, str] | None,
) -> None:
    from worker.metrics import WorkerMetrics

    settings = SimSettings(
        telegram_backend="sim",
        sim_history_start="2025-09-01",
        sim_history_requests=0,
        sim_resolve_requests=0,
        sim_faults=fault,
        retry_max_attempts=2,
        flood_wait_max_seconds=5,
    )
    metrics = WorkerMetrics()
    session = TelegramSession(
        settings,
        "acct1",
        clock=FakeClock(NOW),
        metrics=metrics,
        client_factory=sim_client_factory(settings),
    )
    await session.connect()
    try:
        chat = await session.resolve(parse_chat("@named_errors"))
        session.client.sim.fault_rate = 1.0
        start, end = bounds(date(2025, 11, 1))
        with pytest.raises(error) as info:
            await collect(session, chat, start, end)
    finally:
        await session.close()
    assert name in str(info.value)
    assert getattr(info.value, "rpc_error", None) == name
    if label is not None:
        kind, reason = label
        if kind == "rate_limit":
            value = metrics.registry.get_sample_value(
                "rate_limit_hits_total", {"source": "telegram", "reason": reason}
            )
        else:
            value = metrics.registry.get_sample_value(
                "retries_total", {"target": "telegram_history", "reason": reason}
            )
        assert value is not None and value >= 1


async def test_connect_to_a_server_that_never_answers_fails_within_the_bound(
    clean_env: object,
) -> None:
    settings = SimSettings(
        telegram_backend="sim",
        sim_hang_after_requests=0,
        telegram_request_timeout_seconds=5,
        telegram_connect_timeout_seconds=0.3,
    )
    session = TelegramSession(settings, "acct1", client_factory=sim_client_factory(settings))
    started = time.monotonic()
    with pytest.raises(TransientError, match="TIMEOUT") as info:
        await session.connect()
    assert time.monotonic() - started < 0.6
    assert info.value.retryable
    assert not session.connected
    await session.close()
