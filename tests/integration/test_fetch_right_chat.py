"""Right chat, always: a username that moved to another chat never gets the old chat's
messages written under it, and two chats are never merged in one directory.

The simulator moves the username (``World.move_username`` / ``SIM_MOVED_USERNAMES``) under the
real Telethon client, whose entity cache still maps the name to the old chat.
"""

from __future__ import annotations

from datetime import date

import pytest

from tests.integration.test_fetch import (  # noqa: F401 - env is a fixture
    Env,
    command,
    env,
    read,
)
from worker.errors import ChatMoved, PermanentError

DAY1, DAY2 = date(2025, 11, 6), date(2025, 11, 7)


async def test_a_username_moved_after_it_was_cached_writes_nothing_under_the_old_chat(
    env: Env,  # noqa: F811 - the fixture imported above
) -> None:
    fetcher, session, store, _ = await env(sim_empty_day_ratio=0.0)
    await fetcher.run(command(mode="date", date=DAY1.isoformat()))
    old = read(store.day_path("ru_python", DAY1))["chat_id"]
    session.client.sim.world.move_username("ru_python")

    with pytest.raises(ChatMoved) as moved:
        await fetcher.run(command(mode="date", date=DAY2.isoformat()))
    assert not store.day_path("ru_python", DAY2).exists()
    assert not store.is_complete("ru_python", DAY2)
    assert moved.value.retryable
    new = (await session.resolve(command(mode="date", date=DAY2.isoformat()).chat)).peer_id
    assert new != old
    assert f"cached as chat {old}" in str(moved.value) and f"now names chat {new}" in str(
        moved.value
    )

    # The retry resolves the name afresh; the directory holds the old chat's days: refused.
    with pytest.raises(PermanentError, match="CHAT_ID_CHANGED") as refused:
        await fetcher.run(command(mode="date", date=DAY2.isoformat()))
    assert str(old) in str(refused.value) and str(new) in str(refused.value)
    assert not store.day_path("ru_python", DAY2).exists()
    assert read(store.day_path("ru_python", DAY1))["chat_id"] == old  # untouched


async def test_a_later_run_finding_another_chat_under_the_name_fails_clearly(
    env: Env,  # noqa: F811
) -> None:
    first, _, store, _ = await env(sim_empty_day_ratio=0.0)
    await first.run(command(mode="date", date=DAY1.isoformat()))
    before = store.day_path("ru_python", DAY1).read_bytes()

    later, _, store2, _ = await env(sim_empty_day_ratio=0.0, sim_moved_usernames="ru_python")
    with pytest.raises(PermanentError, match="CHAT_ID_CHANGED"):
        await later.run(command(mode="range", **{"from": DAY1.isoformat(), "to": DAY2.isoformat()}))
    assert store2.day_path("ru_python", DAY1).read_bytes() == before
    assert not store2.day_path("ru_python", DAY2).exists()


async def test_a_cached_name_that_still_holds_is_fetched_without_extra_requests(
    env: Env,  # noqa: F811
) -> None:
    fetcher, session, store, _ = await env(sim_empty_day_ratio=0.0)
    await fetcher.run(command(mode="date", date=DAY1.isoformat()))
    resolves = session.client.sim.requests.get("contacts.ResolveUsername", 0)
    await fetcher.run(command(mode="date", date=DAY2.isoformat()))
    assert session.client.sim.requests.get("contacts.ResolveUsername", 0) == resolves
    assert (
        read(store.day_path("ru_python", DAY2))["chat_id"]
        == read(store.day_path("ru_python", DAY1))["chat_id"]
    )
