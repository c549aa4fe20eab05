"""The shared token bucket against a real redis-server: bounds, concurrency, skewed clocks,
FloodWait pauses, runtime rates, and scripts surviving SCRIPT FLUSH and restarts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from fleet.bucket import TokenBucket, parse_window
from fleet.keys import Keys
from fleet.settings import FleetSettings
from tests.integration.procs import Procs
from tests.redis_server import RedisServer


def settings(**overrides: Any) -> FleetSettings:
    return FleetSettings(_env_file=None, **overrides)


def max_in_window(times: list[float], window: float) -> int:
    """The most events in any closed interval [x, x + window]."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
async def bucket(redis_client: aioredis.Redis) -> TokenBucket:
    return TokenBucket(redis_client, Keys(), settings())


# --- bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["fleet", "session"])
async def test_100_concurrent_acquires_against_a_limit_of_5_admit_exactly_5(
    redis_client: aioredis.Redis, scope: str
) -> None:
    # No refill during the test: one token per 1000 s; burst 5.
    slow = {"per_second": 0.001, "burst": 5}
    fast = {"per_second": 1000.0, "burst": 1000}
    fleet, session = (slow, fast) if scope == "fleet" else (fast, slow)
    s = settings(
        fleet_rate_other_per_second=fleet["per_second"],
        fleet_rate_other_burst=fleet["burst"],
        rate_other_per_second=session["per_second"],
        rate_other_burst=session["burst"],
    )
    for rep in range(100):
        b = TokenBucket(redis_client, Keys(f"rep{rep}:"), s)
        sessions = [f"s{i}" if scope == "fleet" else "one" for i in range(100)]
        results = await asyncio.gather(*(b.acquire(name, "other") for name in sessions))
        immediate = [r for r in results if r.admitted and r.wait_s == 0]
        assert len(immediate) == 5, f"repetition {rep}: {len(immediate)} admitted at once"
        # The rest wait 1000 s, beyond FLOOD_WAIT_MAX_SECONDS: refused, nothing booked.
        assert all(not r.admitted and r.wait_s > 900 for r in results if r not in immediate)


async def test_bookings_of_one_bucket_respect_limit_plus_burst_in_every_window(
    bucket: TokenBucket, redis_client: aioredis.Redis
) -> None:
    await bucket.set_rate("history", 200.0, 4)  # fleet: 200/s, burst 4
    await bucket.set_rate("history", 1e5, 1000, scope="session")
    results = []
    for _ in range(3):  # 3 x 100 at once (the client pool holds 100 connections)
        results += await asyncio.gather(
            *(bucket.acquire(f"s{i % 7}", "history") for i in range(100))
        )
    assert all(r.admitted for r in results)
    booked = [r.send_at_s for r in results]
    for window in (0.01, 0.05, 0.2, 1.0):
        assert max_in_window(booked, window) <= math.floor(window * 200 + 1e-9) + 4


async def test_eight_processes_one_with_a_skewed_clock_never_exceed_limit_plus_burst(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    rate, burst, per_proc = 20.0, 4, 6
    common = {
        "url": redis_url,
        "prefix": "",
        "cls": "history",
        "mode": "admits",
        "count": per_proc,
        "barrier": "t:barrier",
        "stamp_key": "t:stamps",
        "settings": {
            "fleet_rate_history_per_second": rate,
            "fleet_rate_history_burst": burst,
            "rate_history_per_second": 1000.0,
            "rate_history_burst": 1000,
        },
    }
    configs = [{**common, "session": f"w{i}", "skew_s": 0.5 if i == 3 else 0.0} for i in range(8)]
    procs = Procs(configs)
    try:
        await procs.release(redis_client, "t:barrier")
        results = await asyncio.to_thread(procs.results)
    finally:
        procs.kill()
    skews = [r["skew_s"] for r in results]
    assert skews[3] == pytest.approx(0.5, abs=0.15)  # the skew was real in that process
    assert all(abs(s) < 0.15 for i, s in enumerate(skews) if i != 3)

    booked = [t for r in results for t in r["booked"]]
    stamps = [int(x) / 1e6 for x in await redis_client.lrange("t:stamps", 0, -1)]
    assert len(booked) == len(stamps) == 8 * per_proc
    report = {}
    for window in (0.25, 0.5, 1.0, 2.0):
        bound = math.floor(window * rate) + burst
        report[window] = (max_in_window(booked, window), max_in_window(stamps, window), bound)
        # Booked slots (Redis time): the GCRA guarantee, exactly.
        assert report[window][0] <= bound
        # What the "server" saw: the same, allowing 50 ms of process scheduling jitter.
        assert report[window][1] <= math.floor((window + 0.05) * rate) + burst
    print(f"\nadmits per window (booked, observed, limit+burst) with 8 procs: {report}")


# --- pauses (FloodWait) and runtime rates ----------------------------------------------------


async def test_flood_pauses_only_that_session_and_class_for_n_seconds_plus_jitter(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(flood_wait_jitter_seconds=0.5)
    b = TokenBucket(redis_client, Keys(), s, worker_id="w1")
    pause = await b.record_flood("alice", "history", 3)
    assert 3.0 <= pause <= 3.5
    paused = await b.acquire("alice", "history")
    assert not paused.admitted and paused.reason == "paused"
    assert 2.9 <= paused.wait_s <= 3.5
    assert (await b.acquire("alice", "other")).admitted
    # A lone account's flood is its own limit's: the others are not held.
    assert (await b.acquire("bob", "history")).admitted
    # A second account flooding within SHARED_FLOOD_WINDOW_S: the limit is shared, and every
    # other session's history is held fleet-wide for min(N, FLOOD_FLEET_HOLD_SECONDS), refused
    # with the time left, not booked.
    await b.record_flood("carol", "history", 3)
    admits = (await b.counters()).get("history:admits")
    held = await b.acquire("bob", "history")
    assert not held.admitted and held.reason == "held" and 0.9 <= held.wait_s <= 1.0
    assert (await b.counters()).get("history:admits") == admits
    assert (await b.acquire("bob", "other")).admitted
    # A shorter FloodWait does not shorten the pause in force.
    assert await b.record_flood("alice", "history", 1) == pytest.approx(pause, abs=0.05)
    events = await b.recent_floods()
    assert [(e.session, e.request_class, e.seconds, e.worker) for e in events] == [
        ("alice", "history", 1.0, "w1"),
        ("carol", "history", 3.0, "w1"),
        ("alice", "history", 3.0, "w1"),
    ]
    counters = await b.counters()
    assert counters.get("history:floods") == 3
    assert counters.get("rate_limit_hits") == 3 == b.rate_limit_hits
    assert counters.get("session:alice:history:floods") == 2
    # Lifting the pause by hand.
    assert await b.pause("alice", "history", 0) == 0
    await redis_client.delete(Keys().fleet_hold("history"))
    assert (await b.acquire("alice", "history")).admitted
    assert (await b.acquire("bob", "history")).admitted


async def test_a_hold_is_not_shortened_and_zero_disables_it(redis_client: aioredis.Redis) -> None:
    b = TokenBucket(redis_client, Keys(), settings(flood_fleet_hold_seconds=0.5), worker_id="w1")
    await b.record_flood("alice", "history", 30)
    await b.record_flood("dave", "history", 30)  # shared: held 0.5 s
    await b.record_flood("carol", "history", 0.1)  # a shorter hold keeps the longer one
    held = await b.acquire("bob", "history")
    assert held.reason == "held" and 0.4 <= held.wait_s <= 0.5
    snap = await b.snapshot()
    assert set(snap["holds_s"]) == {"history"}
    off = TokenBucket(redis_client, Keys("off:"), settings(flood_fleet_hold_seconds=0))
    await off.record_flood("alice", "history", 30)
    await off.record_flood("dave", "history", 30)
    assert (await off.acquire("bob", "history")).admitted


async def test_waits_longer_than_flood_wait_max_are_refused_without_booking(
    redis_client: aioredis.Redis,
) -> None:
    s = settings(flood_wait_max_seconds=2, rate_resolve_per_second=0.2, rate_resolve_burst=1)
    b = TokenBucket(redis_client, Keys(), s)
    assert (await b.acquire("a", "resolve")).wait_s == 0
    for _ in range(3):  # each would wait 5 s > 2 s: refused, and the refusal books nothing
        r = await b.acquire("a", "resolve")
        assert not r.admitted and r.reason == "session" and 4.5 < r.wait_s <= 5.0


async def test_a_fleet_of_fresh_sessions_resolves_its_chats_at_once_on_the_defaults(
    bucket: TokenBucket,
) -> None:
    # Each account's own resolve bucket paces it (burst 1); the fleet's resolve burst lets
    # twenty fresh sessions resolve one chat each with no wait, and the next one is paced at
    # the fleet's 1/s. With a burst of 2 the twelfth of twelve waited 10 s.
    burst = bucket.settings.fleet_rate_resolve_burst
    assert burst == 20
    first = await asyncio.gather(*(bucket.acquire(f"s{i}", "resolve") for i in range(burst)))
    assert [r.wait_s for r in first] == [0.0] * burst
    late = await bucket.acquire("s-late", "resolve")
    assert late.admitted and late.reason == "fleet" and 0.9 < late.wait_s <= 1.0
    again = await bucket.acquire("s0", "resolve")  # its own bucket: one per 3 s
    assert again.admitted and again.reason == "session" and 2.9 < again.wait_s <= 3.1


async def test_governor_can_change_rates_while_workers_run(bucket: TokenBucket) -> None:
    await bucket.set_rate("other", 0.001, 2)
    assert [(await bucket.acquire(f"s{i}", "other")).admitted for i in range(3)] == [
        True,
        True,
        False,
    ]
    await bucket.set_rate("other", 1000.0, 50)
    assert (await bucket.acquire("s9", "other")).admitted
    rates = await bucket.rates()
    assert rates["fleet"]["other"].per_second == 1000.0
    assert rates["session"]["history"].per_second == bucket.settings.rate_history_per_second
    await bucket.clear_rates()
    assert (await bucket.rates())["fleet"]["other"].burst == bucket.settings.fleet_rate_other_burst


async def test_per_session_override_beats_the_shared_session_rate(bucket: TokenBucket) -> None:
    await bucket.set_rate("history", 100.0, 10)  # the fleet bucket stays out of the way
    await bucket.set_rate("history", 0.001, 1, scope="session:slow")
    assert (await bucket.acquire("slow", "history")).wait_s == 0
    assert not (await bucket.acquire("slow", "history")).admitted
    assert [(await bucket.acquire("fast", "history")).wait_s for _ in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError):
        await bucket.set_rate("history", 1.0, scope="sessions")


async def test_a_window_lets_an_account_burst_k_then_waits_for_its_oldest_to_leave(
    bucket: TokenBucket, redis_client: aioredis.Redis
) -> None:
    """K requests per W s, as Telegram counts them: K at once (no smoothing), then each next one
    when the oldest of the last K leaves the window; other sessions are not concerned."""
    await bucket.set_rate("history", 1000.0, 1000)  # the fleet bucket stays out of the way
    await bucket.set_rate("history", 0.5, 1, scope="session:acct")  # replaced by the window
    await bucket.set_window("acct", "history", 5, 2.0)
    burst = [await bucket.acquire("acct", "history") for _ in range(5)]
    assert all(r.admitted and r.wait_s == 0 for r in burst)
    more = [await bucket.acquire("acct", "history") for _ in range(7)]
    assert all(r.admitted for r in more)
    booked = [r.send_at_s for r in [*burst, *more]]
    # Never more than K in any W (a request at exactly W after another is in a new window)...
    assert max_in_window(booked, 2.0 - 1e-3) <= 5
    # ...and each waits only for the one K places before it to leave (+1 ms).
    for i in range(5, 12):
        assert booked[i] == pytest.approx(booked[i - 5] + 2.0 + 0.001, abs=2e-6)
    assert (await bucket.acquire("other", "history")).wait_s == 0
    with pytest.raises(ValueError):
        await bucket.set_window("acct", "history", 0, 2.0)
    # A value bucket.lua cannot read is ignored: the account's own bucket applies again.
    await redis_client.hset(Keys().rates, "session:acct:history:window", "five per 2 s")
    late = [await bucket.acquire("acct", "history") for _ in range(2)]
    # Its own bucket (0.5/s, burst 1), untouched while the window replaced it: full.
    assert late[0].wait_s == 0 and late[1].wait_s == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize(
    "value", ["3 2000000", "0 2000000", "3 0", "+3 2000000", " 3 2000000", "3 2e6", "3", ""]
)
async def test_parse_window_reads_a_window_exactly_when_bucket_lua_applies_it(
    bucket: TokenBucket, redis_client: aioredis.Redis, value: str
) -> None:
    """The governor reads an account's window (its own limit, for the fleet's saturation) with
    ``parse_window``: a value it reads is one the bucket applies, and one it cannot, the bucket
    ignores."""
    await bucket.set_rate("history", 1000.0, 1000)
    await bucket.set_rate("history", 1000.0, 1000, scope="session:acct")
    await redis_client.hset(Keys().rates, "session:acct:history:window", value)
    waits = [(await bucket.acquire("acct", "history")).wait_s for _ in range(4)]
    applied = waits[3] > 1.0  # the 4th of a 3-per-2 s window waits for the 1st to leave
    assert (parse_window(value) is not None) == applied, (value, waits)
    if applied:
        assert parse_window(value) == (3, 2.0)


async def test_the_window_counts_requests_admitted_before_it_was_set(
    bucket: TokenBucket, redis_client: aioredis.Redis
) -> None:
    """The governor sets a window at a FloodWait: the requests already in Telegram's window
    (admitted by the bucket before) count from then on."""
    await bucket.set_rate("history", 1000.0, 1000)
    await bucket.set_rate("history", 1000.0, 1000, scope="session:acct")
    before = [await bucket.acquire("acct", "history") for _ in range(4)]
    assert all(r.wait_s == 0 for r in before)
    await bucket.set_window("acct", "history", 4, 30.0)
    nxt = await bucket.acquire("acct", "history")
    assert nxt.admitted and nxt.reason == "session"  # booked: the wait is under FLOOD_WAIT_MAX
    assert nxt.send_at_s == pytest.approx(before[0].send_at_s + 30.0 + 0.001, abs=2e-6)
    assert 29.0 < nxt.wait_s <= 30.001


async def test_waiting_is_booked_so_a_worker_sleeps_once(bucket: TokenBucket) -> None:
    await bucket.set_rate("history", 10.0, 1)  # fleet: one per 100 ms
    first, second, third = [await bucket.acquire("a", "history") for _ in range(3)]
    assert first.wait_s == 0
    assert second.admitted and second.reason == "fleet"
    assert 0.09 < second.wait_s <= 0.1
    assert third.send_at_s - second.send_at_s == pytest.approx(0.1, abs=1e-5)
    counters = await bucket.counters()
    assert counters.get("history:admits") == 3
    assert counters.get("history:waits") == counters.get("history:fleet_waits") == 2
    assert counters.get("history:wait_us") > 270_000


async def test_snapshot_shows_rates_tokens_pauses_and_floods(bucket: TokenBucket) -> None:
    await bucket.publish_configured()
    await bucket.acquire("alice", "history")
    await bucket.record_flood("alice", "resolve", 5)
    snap = await bucket.snapshot()
    assert snap["rates"]["fleet"]["history"]["per_second"] == 10.0
    assert snap["tokens"]["session:alice:history"] == pytest.approx(2.0, abs=0.05)
    assert 4.9 < snap["pauses_s"]["alice:resolve"] <= 5.5
    assert snap["recent_floods"][0]["session"] == "alice"
    assert snap["counters"]["history:admits"] == 1


def test_key_schema_shares_one_hash_tag_and_keeps_contract_names() -> None:
    k = Keys()
    assert (k.commands, k.events_channel) == ("tg_commands", "tg_events")
    names = [
        k.fleet_bucket("history"),
        k.session_bucket("a", "resolve"),
        k.pause("a", "other"),
        k.rates,
        k.rates_configured,
        k.floods,
        k.counters,
        k.breaker,
        k.breaker_probe,
        k.processing("w1"),
        k.worker_lease("w1"),
        k.workers,
        k.session_lease("a"),
        k.completed,
        k.dead_letters,
        k.events_stream,
        k.governor_leader,
    ]
    assert all(n.startswith("{tgf}:") for n in names) and len(set(names)) == len(names)
    p = Keys("fleetB:")
    assert p.commands == "fleetB:tg_commands" and p.counters == "fleetB:{tgf}:counters"
    for bad in (lambda: k.pause("a:b", "other"), lambda: k.fleet_bucket("x"), lambda: Keys("{")):
        with pytest.raises(ValueError):
            bad()


# --- scripts survive SCRIPT FLUSH and restarts ------------------------------------------------


async def test_scripts_keep_working_after_script_flush(
    bucket: TokenBucket, redis_client: aioredis.Redis
) -> None:
    assert (await bucket.acquire("a", "history")).admitted
    await redis_client.script_flush()
    assert (await bucket.acquire("a", "history")).admitted
    await redis_client.script_flush()
    assert await bucket.record_flood("a", "other", 1) > 0
    assert (await bucket.counters()).get("history:admits") == 2


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # As a worker builds its client: a few quick retries, so a restart costs one reconnect.
    retry = Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.01), 3)
    client = aioredis.Redis.from_url(private_redis.url, retry=retry)
    try:
        yield client
    finally:
        await client.aclose()


async def test_scripts_and_bucket_state_survive_a_redis_restart(
    private_redis: RedisServer, private_client: aioredis.Redis
) -> None:
    b = TokenBucket(private_client, Keys(), settings(flood_wait_max_seconds=5))
    await b.set_rate("other", 0.01, 2)  # 2 at once, then one per 100 s
    assert [(await b.acquire("a", "other")).admitted for _ in range(3)] == [True, True, False]
    await asyncio.to_thread(private_redis.restart)  # SIGKILL; AOF brings the state back
    r = await b.acquire("a", "other")
    assert not r.admitted and r.wait_s > 90, "the bucket forgot its bookings"
    await b.set_rate("other", 100.0, 2)
    assert (await b.acquire("a", "other")).admitted
