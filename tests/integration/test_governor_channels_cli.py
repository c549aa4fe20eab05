"""``python -m governor channels …`` and ``status`` as real processes against a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from fleet.keys import Keys
from tests.integration.test_governor_daemon import governor_env


def gov(redis_url: str, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "governor", *args],
        cwd=tmp,
        env=governor_env(redis_url, "cli", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_channels_are_added_listed_paused_resumed_and_removed(
    redis_url: str, tmp_path: Path
) -> None:
    r = gov(
        redis_url,
        tmp_path,
        "channels",
        "add",
        "@alpha_chat",
        "https://t.me/beta_chat",
        "--backfill",
        "full",
        "--interval",
        "60",
        "--priority",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["added @alpha_chat", "added @beta_chat"]
    assert gov(redis_url, tmp_path, "channels", "pause", "@beta_chat").returncode == 0
    listed = json.loads(gov(redis_url, tmp_path, "channels", "list", "--json").stdout)
    by_chat = {c["chat"]: c for c in listed}
    assert by_chat["@alpha_chat"]["backfill"] == "full"
    assert by_chat["@alpha_chat"]["interval_s"] == 60 and by_chat["@alpha_chat"]["priority"] == 2
    assert by_chat["@alpha_chat"]["mode"] == "historical"
    assert by_chat["@alpha_chat"]["hwm_id"] is None
    assert by_chat["@beta_chat"]["mode"] == "paused"
    # Changing a paused channel keeps it paused; resume schedules it again.
    changed = gov(redis_url, tmp_path, "channels", "add", "@beta_chat", "--backfill", "2")
    assert changed.returncode == 0 and changed.stdout.strip() == "changed @beta_chat"
    listed = json.loads(gov(redis_url, tmp_path, "channels", "list", "--json").stdout)
    assert [(c["backfill"], c["paused"]) for c in listed if c["chat"] == "@beta_chat"] == [
        (2, True)
    ]
    assert gov(redis_url, tmp_path, "channels", "resume", "beta_chat").returncode == 0
    text = gov(redis_url, tmp_path, "channels", "list").stdout
    assert "@beta_chat" in text and "historical" in text and "paused" not in text
    assert gov(redis_url, tmp_path, "channels", "remove", "@alpha_chat").returncode == 0
    gone = gov(redis_url, tmp_path, "channels", "remove", "@alpha_chat")
    assert gone.returncode == 1 and "not an active channel" in gone.stderr
    client = redis.Redis.from_url(redis_url)
    assert [k.decode() for k in client.hkeys(Keys().channels)] == ["beta_chat"]
    status = gov(redis_url, tmp_path, "status").stdout
    assert "channels: 1" in status and "@beta_chat" in status


def test_bad_channel_arguments_are_refused_and_nothing_is_written(
    redis_url: str, tmp_path: Path
) -> None:
    for args in (
        ("add", "@ok_chat", "not a chat!"),
        ("add", "@ok_chat", "--backfill", "soon"),
        ("add", "@ok_chat", "--interval", "0"),
        ("pause", "joinchat/+abc"),
    ):
        r = gov(redis_url, tmp_path, "channels", *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert redis.Redis.from_url(redis_url).hlen(Keys().channels) == 0


def test_a_bad_channels_file_stops_the_governor_with_exit_78(
    redis_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "channels.yaml"
    bad.write_text("- {chat: '@ok_chat', priority: high}\n")
    r = gov(
        redis_url,
        tmp_path,
        "run",
        FEATURE_INCREMENTAL_PARSING_ENABLED="true",
        PARSER_CHANNELS_FILE=str(bad),
    )
    assert r.returncode == 78
    assert "entry 1" in r.stderr and "priority" in r.stderr
