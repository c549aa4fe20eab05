"""The worker daemon, one test per point of issue 3 (real Redis, real ``python -m worker``
subprocesses, real signals, the Telegram simulator)."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.daemon_harness import (
    Fleet,
    RedisView,
    fetch,
    wait_for,
)

pytestmark = pytest.mark.slow


def _of(rv: RedisView, cid: str) -> list[dict[str, object]]:
    return [e for e in rv.events() if e["command_id"] == cid]


def _terminal(rv: RedisView, cid: str) -> dict[str, object] | None:
    for e in _of(rv, cid):
        if e["event"] == "completed" or (e["event"] == "failed" and not e["retryable"]):
            return e
    return None


# --- 1. reliable take and ack ----------------------------------------------------------------


def test_command_is_acked_only_after_it_completed(
    fleet: Fleet, rv: RedisView, data_dir: Path
) -> None:
    [w] = fleet.start(1, SIM_LATENCY_MS=150)
    cmd = fetch("@ru_python", "2025-03-01", "2025-03-03", command_id="c-ack")
    rv.push(cmd)
    wid = wait_for(lambda: (w.health_data() or {}).get("current") and w.health_data(), 10)[
        "worker_id"
    ]
    assert len(rv.processing(wid)) == 1  # held while it runs
    assert not rv.completed_ids()
    done = wait_for(lambda: _terminal(rv, "c-ack"), 20, "completed")
    assert done["event"] == "completed"
    wait_for(lambda: not rv.processing(wid), 5, "ack")
    assert rv.client.zscore(rv.keys.completed, "c-ack") is not None
    for rel in done["files"]:  # type: ignore[union-attr]
        assert (data_dir.parent / rel).is_file()


def test_command_of_killed_worker_is_redelivered_and_completed(fleet: Fleet, rv: RedisView) -> None:
    workers = fleet.start(2, SIM_LATENCY_MS=150)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-08", command_id="c-kill"))
    victim = wait_for(
        lambda: next((w for w in workers if (w.health_data() or {}).get("current")), None), 10
    )
    wid = victim.health_data()["worker_id"]  # type: ignore[index]
    victim.kill()
    killed_at = time.monotonic()
    assert len(rv.processing(wid)) == 1
    done = wait_for(lambda: _terminal(rv, "c-kill"), 30, "redelivered command completed")
    assert done["event"] == "completed" and done["worker_id"] != wid
    # lease 2 s + recovery every 0.3 s + the fetch itself
    assert time.monotonic() - killed_at < 2 + 8
    assert not rv.processing(wid)


def test_command_that_killed_its_worker_three_times_is_dead_lettered(
    fleet: Fleet, rv: RedisView
) -> None:
    raw = json.dumps(fetch("@ru_python", "2025-03-01", command_id="c-poison"))
    rv.client.rpush(rv.keys.processing("ghost"), raw)  # held by a worker that died
    rv.client.hset(rv.keys.workers, "ghost", "{}")
    rv.client.hset(rv.keys.deliveries, "c-poison", 2)  # it had died twice before
    fleet.start(1)
    failed = wait_for(lambda: _terminal(rv, "c-poison"), 10, "failed event")
    assert failed["event"] == "failed" and failed["retryable"] is False
    assert failed["error"]["type"] == "PoisonCommand"  # type: ignore[index]
    [letter] = rv.dead_letters()
    assert letter["command_id"] == "c-poison" and letter["payload"] == raw
    assert not rv.queue() and not rv.processing("ghost")


# --- 2. idempotency --------------------------------------------------------------------------


def test_same_command_id_pushed_twice_is_executed_once(fleet: Fleet, rv: RedisView) -> None:
    fleet.start(1)
    cmd = fetch("@ru_python", "2025-03-01", command_id="c-twice")
    rv.push(cmd)
    wait_for(lambda: _terminal(rv, "c-twice"), 10)
    rv.push(cmd)
    rv.push(fetch("@other_chat", "2025-03-01", command_id="c-after"))
    wait_for(lambda: _terminal(rv, "c-after"), 10)
    kinds = [e["event"] for e in _of(rv, "c-twice")]
    assert kinds.count("started") == 1 and kinds.count("completed") == 1
    assert not rv.queue()


def test_same_command_id_taken_by_two_workers_at_once_runs_once(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(2, SIM_LATENCY_MS=100)
    cmd = fetch("@ru_python", "2025-03-01", "2025-03-04", command_id="c-dup")
    rv.push(cmd, cmd)  # both workers take a copy at the same moment
    wait_for(lambda: _terminal(rv, "c-dup"), 20)
    wait_for(lambda: not rv.queue() and not rv.client.zcard(rv.keys.delayed), 15, "drained")
    wait_for(lambda: not rv.client.hlen(rv.keys.running), 5, "no command running")
    kinds = [e["event"] for e in _of(rv, "c-dup")]
    assert kinds.count("started") == 1 and kinds.count("completed") == 1


def test_command_without_id_gets_one_that_survives_redelivery(fleet: Fleet, rv: RedisView) -> None:
    [w] = fleet.start(1, SIM_LATENCY_MS=150)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-06"))
    started = wait_for(lambda: rv.by_kind("started"), 10)[0]
    cid = started["command_id"]
    uuid.UUID(cid)
    wid = started["worker_id"]
    [held] = rv.processing(wid)
    assert json.loads(held)["command_id"] == cid  # written back before the fetch
    w.kill()
    fleet.start(1)
    done = wait_for(lambda: _terminal(rv, cid), 20)
    assert done["event"] == "completed"


def test_days_already_complete_are_skipped_unless_forced(fleet: Fleet, rv: RedisView) -> None:
    fleet.start(1)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="first"))
    first = wait_for(lambda: _terminal(rv, "first"), 10)
    rv.push(fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="again"))
    again = wait_for(lambda: _terminal(rv, "again"), 10)
    rv.push(
        fetch(
            "@ru_python", "2025-03-01", "2025-03-02", command_id="forced", options={"force": True}
        )
    )
    forced = wait_for(lambda: _terminal(rv, "forced"), 10)
    assert first["processed"] > 0 and again["processed"] == 0
    assert forced["processed"] == first["processed"]
    assert again["files"] == first["files"] == forced["files"]


# --- 3. validation (the 200-payload test is test_daemon_bad_input.py) -------------------------


def test_invalid_command_is_dead_lettered_and_the_worker_goes_on(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(1)
    rv.push(
        b'{"command":"fetch","chat":"@ok_chat","mode":"range","from":"2025-03-05",'
        b'"to":"2025-03-01","command_id":"bad-range"}'
    )
    rv.push(fetch("@ru_python", "2025-03-01", command_id="good"))
    wait_for(lambda: _terminal(rv, "good"), 10)
    failed = _terminal(rv, "bad-range")
    assert failed is not None and failed["event"] == "failed" and failed["retryable"] is False
    assert failed["chat"] == "@ok_chat"
    assert "after 'to'" in failed["error"]["message"]  # type: ignore[index]
    [letter] = rv.dead_letters()
    assert letter["command_id"] == "bad-range" and letter["source"] == "validation"


# --- 4. events -------------------------------------------------------------------------------


def test_events_follow_the_contract_in_order(fleet: Fleet, rv: RedisView) -> None:
    fleet.start(1, SIM_LATENCY_MS=30)
    rv.push(
        fetch("@ru_python", "2025-03-01", "2025-03-04", command_id="c-ev", requested_by="tests")
    )
    wait_for(lambda: _terminal(rv, "c-ev"), 20)
    events = _of(rv, "c-ev")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert set(kinds[1:-1]) == {"progress"} and len(kinds) >= 3
    always = {
        "event",
        "command_id",
        "chat",
        "mode",
        "params",
        "processed",
        "errors",
        "duration_sec",
        "status",
        "ts",
        "worker_id",
        "service",
    }
    for e in events:
        assert always <= set(e)
        assert e["service"] == "telegram-fetcher" and e["chat"] == "@ru_python"
        assert e["mode"] == "range" and e["params"] == {"from": "2025-03-01", "to": "2025-03-04"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(e["ts"]))
    processed = [int(e["processed"]) for e in events]  # type: ignore[call-overload]
    assert processed == sorted(processed)
    assert len(events[-1]["files"]) == 4  # type: ignore[arg-type]


def test_retryable_failure_is_retried_with_a_delay_then_given_up(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(1, SIM_FAULTS="rpc500", SIM_FAULT_RATE=1, RETRY_MAX_ATTEMPTS=1, COMMAND_RETRY_MAX=2)
    rv.push(fetch("@ru_python", "2025-03-01", command_id="c-retry"))
    final = wait_for(lambda: _terminal(rv, "c-retry"), 30)
    failed = [e for e in _of(rv, "c-retry") if e["event"] == "failed"]
    assert [e["retryable"] for e in failed] == [True, True, False]
    assert final["error"]["type"] == "TransientError"  # type: ignore[index]
    assert [e["event"] for e in _of(rv, "c-retry")].count("started") == 3
    assert not rv.client.zcard(rv.keys.delayed)


def test_permanent_failure_is_not_retried(fleet: Fleet, rv: RedisView) -> None:
    fleet.start(1)
    rv.push(fetch("@missing_chat", "2025-03-01", command_id="c-perm"))
    final = wait_for(lambda: _terminal(rv, "c-perm"), 10)
    assert final["error"]["type"] == "PermanentError"  # type: ignore[index]
    assert [e["event"] for e in _of(rv, "c-perm")] == ["started", "failed"]


# --- 5. sessions -----------------------------------------------------------------------------


def test_fourth_worker_waits_for_a_free_session(fleet: Fleet, rv: RedisView) -> None:
    first = fleet.start(3)
    sessions = sorted(w.health_data()["session"] for w in first)  # type: ignore[index]
    assert sessions == ["sim-1", "sim-2", "sim-3"]
    [fourth] = fleet.start(1, wait_ready=False)
    wait_for(lambda: (fourth.health_data() or {}).get("status") == "waiting_session", 10)
    wait_for(lambda: "no free telegram session" in fourth.log(), 5)
    freed = first[1].health_data()["session"]  # type: ignore[index]
    first[1].signal()
    assert first[1].wait(15) == 0
    wait_for(fourth.ready, 10, "fourth worker took the freed session")
    assert fourth.health_data()["session"] == freed  # type: ignore[index]


def test_revoked_session_releases_its_command_and_exits_77(fleet: Fleet, rv: RedisView) -> None:
    [w] = fleet.start(
        1, SIM_FAULTS="auth_key_unregistered", SIM_FAULT_RATE=1, TELEGRAM_SESSION="sim-2"
    )
    raw = json.dumps(fetch("@ru_python", "2025-03-01", command_id="c-rev"))
    rv.push(raw)
    assert w.wait(15) == 77
    assert rv.queue() == [raw.encode()]  # back on the queue, not failed
    assert not any(e["event"] == "failed" for e in rv.events())
    mark = json.loads(rv.client.hget(rv.keys.sessions_bad, "sim-2"))  # type: ignore[arg-type]
    assert "AUTH_KEY_UNREGISTERED" in mark["reason"] or "revoked" in mark["reason"].lower()
    assert not rv.client.exists(rv.keys.session_lease("sim-2"))


# --- 6. concurrency inside a worker ----------------------------------------------------------


def test_commands_on_different_chats_run_together_same_chat_waits(
    fleet: Fleet, rv: RedisView
) -> None:
    fleet.start(1, PARALLELISM_MAX=2, SIM_LATENCY_MS=100)
    rv.push(
        fetch("@chat_aaaa", "2025-03-01", "2025-03-04", command_id="a1"),
        fetch("@chat_aaaa", "2025-03-05", command_id="a2"),
        fetch("@chat_bbbb", "2025-03-01", "2025-03-04", command_id="b1"),
    )
    for cid in ("a1", "a2", "b1"):
        wait_for(lambda c=cid: _terminal(rv, c), 30, cid)
    order = [(e["event"], e["command_id"]) for e in rv.events() if e["event"] != "progress"]
    pos = {item: i for i, item in enumerate(order)}
    assert pos[("started", "b1")] < pos[("completed", "a1")]  # two chats at once
    assert pos[("completed", "a1")] < pos[("started", "a2")]  # one chat: one at a time
