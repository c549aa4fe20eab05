"""Recovery after deaths: stale ``running`` entries are cleared, and a command that advances
in every attempt is never taken for poison, however often its worker is killed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from fleet.deadletters import list_dead_letters, requeue_dead_letter
from fleet.keys import Keys
from fleet.recovery import recover
from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for
from tests.integration.test_queue import cmd
from worker.queue import WorkQueue

KEYS = Keys("")


async def test_recovery_and_requeue_clear_the_dead_execution_s_running_entry(
    redis_client: aioredis.Redis,
) -> None:
    dead = WorkQueue(redis_client, KEYS, "w1", lease_s=10)
    assert await dead.claim_lease({}) == 2
    await redis_client.rpush(KEYS.commands, cmd(1))
    assert await dead.take(0.1) == cmd(1) and await dead.claim_run("c1") is None
    await redis_client.delete(KEYS.worker_lease("w1"))  # killed: its lease expired

    report = await recover(redis_client, KEYS, max_deliveries=1, dead_letters_max=100)
    [letter] = report.dead_lettered  # poison at once with max 1: into the dead letters
    assert await redis_client.hget(KEYS.running, "c1") is None

    await redis_client.hset(KEYS.running, "c1", "w1|stale")  # as if left by another death
    assert await requeue_dead_letter(redis_client, KEYS, letter.id) is not None
    assert await redis_client.hget(KEYS.running, "c1") is None
    assert await list_dead_letters(redis_client, KEYS) == []


async def test_recovery_leaves_the_running_entry_of_another_live_execution(
    redis_client: aioredis.Redis,
) -> None:
    dead = WorkQueue(redis_client, KEYS, "w1", lease_s=10)
    live = WorkQueue(redis_client, KEYS, "w2", lease_s=10)
    assert await dead.claim_lease({}) == 2 and await live.claim_lease({}) == 2
    await redis_client.rpush(KEYS.commands, cmd(1))
    assert await dead.take(0.1) == cmd(1)
    assert await live.claim_run("c1") is None  # a duplicate copy runs on w2
    await redis_client.delete(KEYS.worker_lease("w1"))
    await recover(redis_client, KEYS, max_deliveries=5, dead_letters_max=100)
    assert (await redis_client.hget(KEYS.running, "c1")).decode() == live.owner


def _complete_days(data_dir: Path) -> int:
    try:
        progress = json.loads((data_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return 0
    days = progress.get("chats", {}).get("ru_python", {})
    return sum(1 for entry in days.values() if entry.get("complete"))


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(
        redis_url,
        data_dir,
        tmp_path,
        COMMAND_MAX_DELIVERIES=2,
        SIM_LATENCY_MS=150,  # ~0.3 s a day: each execution is killed long before the end
        SIM_SESSIONS="sim-1,sim-2,sim-3,sim-4,sim-5",
    )


@pytest.mark.slow
def test_a_command_killed_with_its_worker_after_each_bit_of_progress_is_not_poison(
    fleet: Fleet, rv: RedisView, data_dir: Path
) -> None:
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-30", command_id="long"))
    for kill in range(3):
        before = _complete_days(data_dir)
        [w] = fleet.start(1)
        wait_for(lambda b=before: _complete_days(data_dir) > b, 30, f"progress before kill {kill}")
        # The attempt registers its progress (resets the count) right after its first page is
        # stored; a kill between the two counts as a death without progress, so wait for it.
        wait_for(
            lambda: rv.client.hget(rv.keys.deliveries, "long") is None, 10, "progress registered"
        )
        w.kill()
        time.sleep(0.2)
    # The last execution may run at full speed: the kills above are what is tested.
    fleet.start(1, SIM_LATENCY_MS=0)
    end = wait_for(
        lambda: [e for e in rv.events() if e["command_id"] == "long" and e["event"] != "started"
                 and e["event"] != "progress"],
        60,
        "a terminal event",
    )  # fmt: skip
    assert [e["event"] for e in end] == ["completed"], end
    assert len(end[0]["files"]) == 30
    assert not rv.dead_letters()


async def test_a_retryable_failure_resets_the_command_s_delivery_count(
    redis_client: aioredis.Redis,
) -> None:
    q = WorkQueue(redis_client, KEYS, "w1", lease_s=10)
    assert await q.claim_lease({}) == 2
    await redis_client.hset(KEYS.deliveries, "c1", 2)  # two earlier executions died
    await redis_client.rpush(KEYS.commands, cmd(1))
    assert await q.take(0.1) == cmd(1)
    # This execution ended in a controlled, retryable failure (a full disk, a flood wait): it
    # did not kill its worker, so the command is no closer to being poison.
    assert await q.retry_later(cmd(1), "c1", 0.1) == 1
    assert await redis_client.hget(KEYS.deliveries, "c1") is None


@pytest.mark.slow
def test_a_command_waiting_for_its_chat_is_not_counted_toward_poison(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(1, SIM_LATENCY_MS=200)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-10", command_id="first"))
    wait_for(lambda: rv.by_kind("started"), 20, "the first command running")
    rv.client.hset(rv.keys.deliveries, "second", 2)  # two earlier executions died
    rv.push(fetch("@ru_python", "2025-03-05", command_id="second"))
    wait_for(
        lambda: rv.client.hget(rv.keys.deliveries, "second") is None,
        20,
        "the waiting command's count forgotten",
    )
    assert not [e for e in rv.by_kind("started") if e["command_id"] == "second"]  # still waits
