"""Crash test (issue 3 acceptance): 3 workers, 30 commands, one worker ``kill -9``ed in the
middle of a command at a random moment, 5 times. Every command ends ``completed``, none is lost,
and the files equal those of an uninterrupted run (ignoring ``fetched_at``). Prints the time
from the kill to the victim's commands completing elsewhere (target: lease + 2 s)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import redis as syncredis

from tests.integration.daemon_harness import (
    Fleet,
    RedisView,
    base_env,
    day_files,
    fetch,
    wait_for,
)

pytestmark = pytest.mark.slow
LEASE_S = 2.0
TRIALS = 5
N_COMMANDS = 30
ENV = {"WORKER_LEASE_SECONDS": LEASE_S, "SIM_MESSAGES_PER_DAY": 150, "PARALLELISM_MAX": 2}


def _commands(trial: int) -> list[dict[str, object]]:
    return [
        fetch(f"@crash_chat_{i:02d}", "2025-04-01", "2025-04-03", command_id=f"t{trial}-c{i:02d}")
        for i in range(N_COMMANDS)
    ]


def _run(
    redis_url: str, tmp: Path, trial: int, *, kill: bool, rng: random.Random
) -> tuple[Path, list[float]]:
    syncredis.Redis.from_url(redis_url).flushall()
    data = tmp / f"data-{trial}"
    work = tmp / f"trial-{trial}"
    work.mkdir()
    fleet = Fleet(base_env(redis_url, data, work, SIM_LATENCY_MS=40, **ENV), work)
    rv = RedisView(redis_url)
    recovered_after: list[float] = []
    try:
        workers = fleet.start(3)
        ids = {w.health_data()["worker_id"]: w for w in workers}  # type: ignore[index]
        cmds = _commands(trial)
        rv.push(*cmds)
        if kill:
            victim_id = rng.choice(sorted(ids))
            victim = ids[victim_id]
            # wait until the victim is in the middle of a command, then a random moment more
            wait_for(
                lambda: any(e["worker_id"] == victim_id for e in rv.by_kind("started")),
                20,
                "victim started a command",
            )
            time.sleep(rng.uniform(0.0, 0.25))
            held = [json.loads(r)["command_id"] for r in rv.processing(victim_id)]
            victim.kill()
            killed_at = time.monotonic()
            assert held, "the victim held no command when killed"
            pending = set(held)
            while pending:
                done = rv.completed_ids() & pending
                for _ in done:
                    recovered_after.append(time.monotonic() - killed_at)
                pending -= done
                assert time.monotonic() - killed_at < 30, f"not recovered: {pending}"
                time.sleep(0.02)
        wanted = {c["command_id"] for c in cmds}
        wait_for(lambda: wanted <= rv.completed_ids(), 60, "every command completed")
        assert not rv.queue()
        for wid in ids:
            wait_for(lambda w=wid: not rv.processing(w), 10, f"{wid} acked everything")
        assert not any(e["event"] == "failed" for e in rv.events())
        assert not rv.dead_letters()
        survivors = [w for w in workers if w.proc.poll() is None]
        assert len(survivors) == (2 if kill else 3)
    finally:
        codes = fleet.stop_all()
        rv.close()
    assert all(code in (0, -9) for code in codes), codes
    return data, recovered_after


def test_kill_9_mid_command_loses_nothing_and_files_match_an_uninterrupted_run(
    redis_url: str, tmp_path: Path
) -> None:
    rng = random.Random(20251109)
    base_dir, _ = _run(redis_url, tmp_path, 0, kill=False, rng=rng)
    baseline = day_files(base_dir)
    assert len(baseline) == N_COMMANDS * 3
    timings = []
    for trial in range(1, TRIALS + 1):
        data, recovered = _run(redis_url, tmp_path, trial, kill=True, rng=rng)
        assert day_files(data) == baseline, f"trial {trial}: files differ"
        timings.append(max(recovered))
        print(
            f"trial {trial}: kill -> victim's commands completed elsewhere: "
            + ", ".join(f"{t:.2f}s" for t in recovered)
        )
    print(f"max {max(timings):.2f}s, target lease + 2 = {LEASE_S + 2:.1f}s")
    assert max(timings) <= LEASE_S + 2 + 1.0  # 1 s of slack for a loaded CI machine
