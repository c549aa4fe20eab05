"""A per_day command split into per-day parts that the whole fleet runs (issue 14): real Redis,
real worker processes on the simulator, a real SIGKILL of a worker holding a part."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet.keys import Keys
from tests.integration.daemon_harness import Fleet, RedisView, base_env, day_files, wait_for

pytestmark = pytest.mark.slow

DAYS = 6


def parent(chat: str, cid: str, **extra: Any) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    return {
        "command": "fetch",
        "chat": chat,
        "mode": "range",
        "from": (today - timedelta(days=DAYS)).isoformat(),
        "to": (today - timedelta(days=1)).isoformat(),
        "strategy": "per_day",
        "command_id": cid,
        **extra,
    }


def events_of(view: RedisView, cid: str) -> list[dict[str, Any]]:
    return [e for e in view.events() if e["command_id"] == cid]


def terminal(view: RedisView, cid: str) -> list[dict[str, Any]]:
    return [e for e in events_of(view, cid) if e["event"] in ("completed", "failed")]


def unsplit_reference(redis_url: str, tmp: Path, chat: str) -> dict[str, Any]:
    """The same command run by one worker without splitting, into its own data root."""
    data = tmp / "reference"
    run_dir = tmp / "ref-run"
    run_dir.mkdir()
    view = RedisView(redis_url)
    env = base_env(redis_url, data, run_dir, SIM_MESSAGES_PER_DAY=400)
    fleet = Fleet(env, run_dir)
    try:
        fleet.start(1)
        view.push(parent(chat, "reference-1"))
        wait_for(lambda: terminal(view, "reference-1"), 60, "the unsplit reference")
    finally:
        fleet.stop_all()
        view.close()
    return day_files(data)


@pytest.mark.timeout(240)
def test_one_command_is_spread_over_the_fleet_and_closed_by_one_event(
    redis_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(
        redis_url,
        data,
        tmp_path,
        SIM_MESSAGES_PER_DAY=400,
        SIM_LATENCY_MS=150,  # a part takes ~1 s: every worker takes one, and a kill lands in one
        FETCH_SPLIT_PER_DAY="true",
        PARALLELISM_MAX=1,
    )
    view = RedisView(redis_url)
    fleet = Fleet(env, tmp_path)
    try:
        workers = fleet.start(3)
        view.push(parent("@split_chat", "big-1", after_id=0))
        # Kill -9 a worker while it holds a part: the part is recovered and run elsewhere.
        ids = {(w.health_data() or {}).get("worker_id"): w for w in workers}
        holder = wait_for(
            lambda: next(
                (w for w in ids if w and any(b"part_of" in e for e in view.processing(w))), None
            ),
            60,
            "a part held",
        )
        victim = ids[holder]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        wait_for(lambda: terminal(view, "big-1"), 120, "the parent's terminal event")
        fleet.stop_all()
    finally:
        fleet.stop_all()
    evs = events_of(view, "big-1")
    kinds = [e["event"] for e in evs]
    assert kinds.count("started") == 1 and kinds[0] == "started"
    assert kinds.count("completed") == 1 and kinds[-1] == "completed", kinds
    assert "failed" not in kinds
    progress = [e for e in evs if e["event"] == "progress"]
    assert len({e["worker_id"] for e in progress}) >= 2  # parts ran on several workers
    processed = [e["processed"] for e in progress]
    assert processed == sorted(processed)  # sums over the parts, growing
    done = evs[-1]
    stored = day_files(data)
    total = sum(f["message_count"] for f in stored.values())
    # The killed part's journal is resumed, not re-counted: at most every message once.
    assert progress[-1]["processed"] < done["processed"] <= total
    assert len(done["files"]) == DAYS
    assert view.client.zscore(Keys().completed, "big-1") is not None
    assert not view.client.keys(Keys().split("*"))  # the record went with the last part
    mark = json.loads(view.client.hget(Keys().hwm, "split_chat"))
    assert mark["id"] == max(m["id"] for f in stored.values() for m in f["messages"])
    # The same days as one unsplit fetch, byte for byte apart from fetched_at.
    assert stored == unsplit_reference(redis_url, tmp_path, "@split_chat")
    view.close()


@pytest.mark.timeout(120)
def test_days_unreadable_on_every_session_are_listed_in_the_one_failed_event(
    redis_url: str, tmp_path: Path
) -> None:
    env = base_env(redis_url, tmp_path / "data", tmp_path, FETCH_SPLIT_PER_DAY="true")
    view = RedisView(redis_url)
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(2)
        view.push(parent("@private_chat", "big-2"))
        wait_for(lambda: terminal(view, "big-2"), 60, "the parent's terminal event")
        fleet.stop_all()
    finally:
        fleet.stop_all()
    final = terminal(view, "big-2")
    assert len(final) == 1 and final[0]["event"] == "failed"
    assert final[0]["retryable"] is False
    message = final[0]["error"]["message"]
    assert message.startswith(f"{DAYS} of {DAYS} days failed")
    today = datetime.now(UTC).date()
    for i in range(1, DAYS + 1):
        assert (today - timedelta(days=i)).isoformat() in message
    # CHANNEL_PRIVATE is about one account: each day was tried on both sessions first.
    assert message.count("(on 2 sessions)") == DAYS, message
    assert view.client.zscore(Keys().completed, "big-2") is None
    view.close()
