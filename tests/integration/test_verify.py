"""``worker verify``: days changed on the server after they were written are found (and, with
``--repair``, fetched again), through the real Telethon client over the simulator."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from telethon import utils

from fleet.exitcodes import Exit
from tests.integration.test_fetch import (  # noqa: F401 - env is a fixture
    LIMITS,
    Env,
    command,
    env,
    history_requests,
    read,
    truth,
)
from worker.verify import Verifier, written_days

ROOT = Path(__file__).resolve().parents[2]
DAYS = [date(2025, 11, 5), date(2025, 11, 6), date(2025, 11, 7)]


async def test_verify_reports_a_day_edited_deleted_and_added_behind_our_back_and_repairs_it(
    env: Env,  # noqa: F811 - the fixture imported above
) -> None:
    fetcher, session, store, _ = await env(sim_empty_day_ratio=0.0, sim_messages_per_day=50)
    cmd = command(mode="range", **{"from": "2025-11-05", "to": "2025-11-07"})
    await fetcher.run(cmd)
    chat = await session.resolve(cmd.chat)
    bare, _ = utils.resolve_id(chat.peer_id)
    world = session.client.sim.world
    changed_day = DAYS[1]
    index = (changed_day - world.start.date()).days
    touched = world.change_day(bare, index, delete=1, add=1, edit=1)
    assert all(touched.values())

    verifier = Verifier(session, store, tz=fetcher.tz)
    assert written_days(store, "ru_python") == DAYS
    before = history_requests(session)
    checks = await verifier.check(cmd.chat, DAYS)
    assert history_requests(session) - before == len(DAYS)  # ≤ 100 messages: 1 request a day
    by_day = {c.day: c for c in checks}
    assert [d for d, c in by_day.items() if c.changed or c.deleted] == [changed_day]
    check = by_day[changed_day]
    assert check.added == touched["added"]
    assert check.edited == touched["edited"]
    assert check.deleted == touched["deleted"]

    await verifier.repair(cmd.chat, checks, fetcher, today=LIMITS.today)
    assert check.repaired
    doc = read(store.day_path("ru_python", changed_day))
    by_id = {m["id"]: m for m in doc["messages"]}
    assert touched["added"][0] in by_id
    assert by_id[touched["edited"][0]]["text"].endswith("(edited)")
    assert touched["deleted"][0] in by_id  # the archive keeps what was said
    assert set(truth(session, chat.peer_id, changed_day)) <= set(by_id)
    again = {c.day: c for c in await verifier.check(cmd.chat, DAYS)}
    assert not any(c.changed for c in again.values())
    assert again[changed_day].deleted == touched["deleted"]


def test_verify_command_checks_what_fetch_wrote(tmp_path: Path) -> None:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "METRICS_", "PUSHGATEWAY_", "LOKI_"))
    }
    environ.update(
        PYTHONPATH=str(ROOT),
        TELEGRAM_BACKEND="sim",
        SIM_HISTORY_START="2025-01-01",
        SIM_MESSAGES_PER_DAY="60",
        SIM_HISTORY_REQUESTS="0",
        SIM_RESOLVE_REQUESTS="0",
        DATA_DIR=str(tmp_path / "data"),
        METRICS_MODE="off",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    fetched = run("fetch", "--chat", "@verify_me", "--from", "2025-03-01", "--to", "2025-03-02")
    assert fetched.returncode == Exit.OK, fetched.stderr
    verified = run("verify", "--chat", "@verify_me")
    assert verified.returncode == Exit.OK, verified.stderr
    assert "2025-03-01: ok" in verified.stdout and "2025-03-02: ok" in verified.stdout
    assert "verified 2 days" in verified.stdout and "0 changed" in verified.stdout
    bad = run("verify", "--chat", "@verify_me", "--from", "March")
    assert bad.returncode == Exit.USAGE and "invalid request" in bad.stderr
