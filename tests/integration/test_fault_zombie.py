"""A worker paused past its lease (a zombie) must not end a command another worker now owns.

The terminal step (ack / retry later / dead letter, with its event) is one script that checks
ownership itself: the check cannot be separated from the step by a pause of the process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from fleet.deadletters import new_dead_letter
from fleet.events import make_event
from fleet.keys import Keys
from fleet.recovery import recover
from tests.integration.daemon_harness import Fleet, RedisView, fetch, wait_for
from tests.integration.test_queue import cmd
from worker.queue import WorkQueue

KEYS = Keys("")


async def _zombie_and_owner(client: aioredis.Redis) -> tuple[WorkQueue, WorkQueue, bytes]:
    """``z`` took command c1, its lease expired, a recovery gave c1 to ``w`` which took it."""
    z = WorkQueue(client, KEYS, "zombie", lease_s=10)
    w = WorkQueue(client, KEYS, "owner", lease_s=10)
    assert await z.claim_lease({}) == 2 and await w.claim_lease({}) == 2
    await client.rpush(KEYS.commands, cmd(1))
    raw = await z.take(0.1)
    assert raw is not None and await z.claim_run("c1") is None
    await client.delete(KEYS.worker_lease("zombie"))  # its lease expired while it was stopped
    report = await recover(client, KEYS, max_deliveries=5, dead_letters_max=100)
    assert report.recovered == {"zombie": 1}
    assert await w.take(0.1) == raw and await w.claim_run("c1") is None
    return z, w, raw


def _failed(worker: str) -> dict[str, object]:
    return make_event(
        "failed", command_id="c1", chat="@chat_001", mode="date", params={}, worker_id=worker,
        error_type="RuntimeError", error_message="boom", retryable=False,
    )  # fmt: skip


async def test_a_zombie_s_terminal_steps_do_nothing_and_publish_nothing(
    redis_client: aioredis.Redis,
) -> None:
    z, w, raw = await _zombie_and_owner(redis_client)
    letter = new_dead_letter(raw, reason="internal error", error_type="RuntimeError",
                             command_id="c1", chat="@chat_001", worker_id="zombie",
                             source="internal")  # fmt: skip
    assert not await z.dead_letter(raw, letter, event=_failed("zombie"))
    assert not await z.ack(raw, "c1", completed=True, event=_failed("zombie"))
    assert await z.retry_later(raw, "c1", 1.0, event=_failed("zombie")) == -1
    assert await z.retry_later(raw, "c1", 1.0, count=False) == -1
    assert await redis_client.llen(KEYS.dead_letters) == 0
    assert await redis_client.zcard(KEYS.delayed) == 0  # no duplicate parked for later
    assert await redis_client.xlen(KEYS.events_stream) == 0
    assert await redis_client.zscore(KEYS.completed, "c1") is None
    # The owner's execution is untouched and ends normally, with its one event.
    assert await redis_client.lrange(KEYS.processing("owner"), 0, -1) == [raw]
    assert await w.ack(raw, "c1", completed=True, event=_failed("owner"))
    assert await redis_client.xlen(KEYS.events_stream) == 1


async def test_a_process_restarted_under_the_same_worker_id_is_another_owner(
    redis_client: aioredis.Redis,
) -> None:
    old = WorkQueue(redis_client, KEYS, "w1", lease_s=10)
    assert await old.claim_lease({}) == 2 and await old.claim_run("c1") is None
    new = WorkQueue(redis_client, KEYS, "w1", lease_s=10)  # same WORKER_ID, new token
    # The old process is alive (its lease is held under its token): the new one must wait.
    assert await new.claim_run("c1") == "w1"
    await redis_client.delete(KEYS.worker_lease("w1"))
    assert await new.claim_lease({}) == 2  # old died; the restarted process leases the id
    assert await new.claim_run("c1") is None  # the entry naming the dead process is stale


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_before_its_ack_publishes_no_second_terminal_event(
    fleet: Fleet, rv: RedisView, tmp_path: Path
) -> None:
    pause = tmp_path / "pause-before-terminal"
    [a] = fleet.start(1, WORKER_TEST_PAUSE_FILE=pause)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="z1"))
    wait_for(pause.exists, 30, "A at its terminal step")
    os.kill(a.pid, signal.SIGSTOP)  # paused past its lease (WORKER_LEASE_SECONDS=2)
    try:
        fleet.start(1, wait_ready=False)
        done = wait_for(
            lambda: [e for e in rv.by_kind("completed") if e["command_id"] == "z1"],
            40,
            "B completes the recovered command",
        )
        assert done[0]["worker_id"] != "" and "sim-2" in done[0]["worker_id"], done
    finally:
        pause.unlink(missing_ok=True)
        os.kill(a.pid, signal.SIGCONT)
    wait_for(
        lambda: "no event" in a.log() or "command completed" in a.log(), 20, "A's terminal step"
    )
    terminal = [
        e for e in rv.events() if e["command_id"] == "z1" and e["event"] in ("completed", "failed")
    ]
    assert len(terminal) == 1, terminal
    assert not rv.dead_letters()
    assert fleet.stop_all() == [0, 0]
