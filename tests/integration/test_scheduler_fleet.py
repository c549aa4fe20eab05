"""Issue 14's acceptance test: the incremental scheduler driving a real fleet.

Real redis-server, three real ``python -m worker`` processes on the simulator (below Telethon),
two real ``python -m governor`` processes. Ten channels, a 2-second interval. The simulator's
``SIM_HORIZON_FILE`` makes new messages appear at runtime (the deterministic history up to the
horizon, in every process at once). The first tick backfills every channel; each later horizon
step is picked up by incremental runs that fetch exactly the new messages; the leading governor
is killed with SIGKILL while its commands are in flight and the standby carries on; at the end
every day file equals a one-shot fetch of the same days, and no mark is ahead of the files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fleet.keys import Keys
from tests.integration.daemon_harness import Fleet, RedisView, base_env, day_files, wait_for
from tests.integration.test_governor_daemon import governor_env
from worker.sim.world import World, chat_id_for

pytestmark = pytest.mark.slow

CHATS = [f"sched_chan_{i:02d}" for i in range(10)]
PER_DAY = 1500
SEED = 7
BACKFILL = 2
STEPS = 4


def noon_timezone(now: datetime) -> str:
    """A fixed-offset zone where it is around midday now, so that 'today' has hours of
    history before the horizon whatever time the test runs (Etc/GMT signs are inverted)."""
    offset = 12 - now.hour
    offset = max(-12, min(14, offset))
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


class Horizon:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.value: datetime | None = None

    def set(self, moment: datetime) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(moment.timestamp()))
        os.replace(tmp, self.path)
        self.value = moment


def expected_marks(world: World, first_day_start: datetime, horizon: datetime) -> dict[str, int]:
    """Per chat, the highest id the simulator shows in the fetched window up to the horizon
    (a message dated exactly at the horizon is visible)."""
    out = {}
    for chat in CHATS:
        end = horizon + timedelta(seconds=1)
        msgs = world.messages_between(chat_id_for(chat), first_day_start, end)
        out[chat] = max((i for i, _ in msgs), default=0)
    return out


def count_between(world: World, chat: str, start: datetime, end: datetime) -> int:
    return len(world.messages_between(chat_id_for(chat), start, end))


def marks(view: RedisView) -> dict[str, dict[str, Any]]:
    raw = view.client.hgetall(Keys().hwm)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def leader(view: RedisView) -> str | None:
    raw = view.client.get(Keys().governor_leader)
    return raw.decode().rsplit(":", 1)[0] if raw else None


def completed_log_lines(logs: list[str]) -> list[dict[str, Any]]:
    out = []
    for text in logs:
        for line in text.splitlines():
            if '"command_completed"' not in line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backfill", ["batch", "split"])
def test_ten_channels_stay_current_through_a_governor_kill_and_match_a_one_shot_fetch(
    redis_url: str, tmp_path: Path, backfill: str
) -> None:
    """``split``: backfills are per_day commands that the workers split into per-day parts."""
    real_now = datetime.now(UTC)
    tz_name = noon_timezone(real_now)
    tz = ZoneInfo(tz_name)
    today = real_now.astimezone(tz).date()
    first_day = today - timedelta(days=BACKFILL)
    first_day_start = datetime.combine(first_day, datetime.min.time(), tzinfo=tz)
    today_start = datetime.combine(today, datetime.min.time(), tzinfo=tz)
    # Horizon steps inside today: from 3 h before now (or just after midnight) up to now.
    window = min(timedelta(hours=3), real_now - today_start - timedelta(minutes=1))
    h0 = (real_now - window).replace(microsecond=0)  # whole seconds, like message dates
    steps = [(h0 + window * k / STEPS).replace(microsecond=0) for k in range(1, STEPS + 1)]
    horizon = Horizon(tmp_path / "horizon")
    horizon.set(h0)
    world = World(
        seed=SEED,
        messages_per_day=PER_DAY,
        empty_day_ratio=0.1,
        history_start=date(2024, 1, 1),
        now=lambda: horizon.value or real_now,
    )

    data = tmp_path / "data"
    env = base_env(
        redis_url,
        data,
        tmp_path,
        SIM_SEED=SEED,
        SIM_MESSAGES_PER_DAY=PER_DAY,
        SIM_HORIZON_FILE=horizon.path,
        DAY_TIMEZONE=tz_name,
        LOG_FORMAT="json",
        FETCH_SPLIT_PER_DAY="true" if backfill == "split" else "false",
    )
    gov_extra = {
        "FEATURE_INCREMENTAL_PARSING_ENABLED": "true",
        "PARSER_SCHEDULER_INTERVAL_SEC": "2",
        "PARSER_MAX_CONCURRENCY": "10",
        "DAY_TIMEZONE": tz_name,
        "GOVERNOR_TICK_SECONDS": "0.3",
        "GOVERNOR_LEASE_SECONDS": "1.0",
        "WORKER_LEASE_SECONDS": "2",
        "PARSER_HISTORICAL_STRATEGY": "per_day" if backfill == "split" else "batch",
    }
    chats = [f"@{c}" for c in CHATS]
    add = subprocess.run(
        [sys.executable, "-m", "governor", "channels", "add", *chats, "--backfill", str(BACKFILL)],
        cwd=tmp_path,
        env={**governor_env(redis_url, "cli"), **gov_extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert add.returncode == 0, add.stderr

    view = RedisView(redis_url)
    fleet = Fleet(env, tmp_path)
    governors: dict[str, subprocess.Popen[bytes]] = {}
    gov_logs = []
    try:
        fleet.start(3)
        for gid in ("gov-a", "gov-b"):
            log = open(tmp_path / f"{gid}.log", "wb")  # noqa: SIM115
            gov_logs.append(log)
            governors[gid] = subprocess.Popen(
                [sys.executable, "-m", "governor"],
                cwd=tmp_path,
                env={**governor_env(redis_url, gid), **gov_extra},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def caught_up(expected: dict[str, int]) -> bool:
            got = marks(view)
            return all(got.get(c, {}).get("id") == expected[c] for c in CHATS)

        # The first tick backfills every channel (historical), marks at the newest message; the
        # channels' second runs (incremental, nothing new yet) may follow.
        wait_for(lambda: caught_up(expected_marks(world, first_day_start, h0)), 120, "backfill")
        first_runs = [e for e in view.by_kind("started") if e["command_id"].endswith(":1")]
        assert len(first_runs) == len(CHATS)
        assert all(e["params"]["after_id"] == 0 for e in first_runs)
        assert {e["params"]["from"] for e in first_runs} == {first_day.isoformat()}
        if backfill == "split":  # each backfill ran as per-day parts over the fleet
            assert sum(w.log().count('"command_split"') for w in fleet.workers) == len(CHATS)

        killed = None
        for k, step in enumerate(steps, 1):
            horizon.set(step)
            if k == 2:
                # Kill -9 the leader while its scheduler has commands in flight.
                wait_for(lambda: view.client.hlen(Keys().sched_inflight) > 0, 30, "in flight")
                killed = leader(view)
                assert killed in governors
                governors[killed].send_signal(signal.SIGKILL)
            wait_for(
                lambda step=step: caught_up(expected_marks(world, first_day_start, step)),
                120,
                f"horizon step {k}",
            )
        assert killed is not None
        survivor = next(g for g in governors if g != killed)
        assert leader(view) == survivor

        # No mark is ahead of the files: each mark's id is the newest message stored.
        stored = day_files(data)
        for chat in CHATS:
            ids = [
                m["id"]
                for path, f in stored.items()
                if path.startswith(chat + "/")
                for m in f["messages"]
            ]
            assert ids and max(ids) == marks(view)[chat]["id"], chat
            assert len(ids) == len(set(ids)), f"duplicates in {chat}"

        for proc in governors.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in governors.values():
            proc.wait(20)
        assert fleet.stop_all() == [0, 0, 0]

        # Never two commands of one chat at once, each scheduled command completed once.
        open_by_chat: dict[str, str] = {}
        completed: dict[str, int] = defaultdict(int)
        for e in view.events():
            cid = e.get("command_id") or ""
            if not cid.startswith("sched:"):
                continue
            chat = cid.split(":")[1]
            if e["event"] == "started":
                other = open_by_chat.get(chat)
                assert other in (None, cid), f"{cid} started while {other} was not over"
                open_by_chat[chat] = cid
            elif e["event"] == "completed" or (e["event"] == "failed" and not e["retryable"]):
                open_by_chat.pop(chat, None)
                completed[cid] += e["event"] == "completed"
        assert all(n == 1 for n in completed.values()), completed
        for chat in CHATS:
            seqs = sorted(int(c.split(":")[2]) for c in completed if c.split(":")[1] == chat)
            assert seqs == list(range(1, len(seqs) + 1)), (chat, seqs)  # none skipped/doubled

        # Later runs fetched exactly the new messages: what the incremental runs received from
        # Telegram adds up to what appeared after the backfill, nothing twice.
        lines = completed_log_lines([w.log() for w in fleet.workers])
        fetched_after_backfill: dict[str, int] = defaultdict(int)
        for line in lines:
            cid = line.get("command_id", "")
            if cid.startswith("sched:") and not cid.endswith(":1"):
                fetched_after_backfill[cid.split(":")[1]] += int(line["message_count"])
        for chat in CHATS:
            second = timedelta(seconds=1)
            new = count_between(world, chat, h0 + second, steps[-1] + second)
            assert fetched_after_backfill[chat] == new, (chat, fetched_after_backfill[chat], new)
        assert sum(fetched_after_backfill.values()) > 0

        # Every day file equals a one-shot fetch of the same days, same world.
        data2 = tmp_path / "data-oneshot"
        one = Fleet(
            base_env(redis_url, data2, tmp_path, **{**_sim(env), "LOG_FORMAT": "json"}),
            tmp_path / "oneshot",
        )
        (tmp_path / "oneshot").mkdir()
        one.start(1)
        try:
            view.push(
                *(
                    {
                        "command": "fetch",
                        "chat": f"@{c}",
                        "mode": "range",
                        "from": first_day.isoformat(),
                        "to": today.isoformat(),
                        "command_id": f"oneshot-{c}",
                    }
                    for c in CHATS
                )
            )
            wait_for(
                lambda: {f"oneshot-{c}" for c in CHATS} <= view.completed_ids(), 120, "one-shot"
            )
        finally:
            one.stop_all()
        assert day_files(data2) == stored
        assert len(stored) == len(CHATS) * (BACKFILL + 1)
    finally:
        for proc in governors.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for log in gov_logs:
            log.close()
        fleet.stop_all()
        view.close()


def _sim(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(("SIM_", "DAY_TIMEZONE"))}
