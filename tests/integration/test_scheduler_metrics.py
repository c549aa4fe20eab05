"""The governor's scheduler and split metrics, scraped from a real ``python -m governor``."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from fleet.keys import Keys
from governor.channels import Channel
from tests.integration.daemon_harness import wait_for
from tests.integration.obs_harness import (
    GovernorProc,
    governor_env,
    samples,
    scrape,
    wait_leading,
)
from tests.redis_server import free_port


def value(families: dict, name: str, **labels: str) -> float | None:
    for s in samples(families, name.removesuffix("_total")):  # a counter's family name
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def test_ticks_pushes_modes_lag_and_split_parts_are_exported(
    redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    for chat, paused in (("@alpha_chat", False), ("@beta_chat", False), ("@gamma_chat", True)):
        ch = Channel.new(chat, paused=paused)
        client.hset(keys.channels, ch.key, ch.to_json())
    # A split command with three parts not over (worker/parts.py's record).
    client.hset(keys.split("p1"), mapping={"total": 3})
    client.sadd(keys.split("p1") + ":pending", "2025-11-01", "2025-11-02", "2025-11-03")
    port = free_port()
    gov = GovernorProc(
        governor_env(
            redis_url,
            "gov-m",
            METRICS_MODE="scrape",
            METRICS_HOST="127.0.0.1",
            METRICS_PORT=port,
            FEATURE_INCREMENTAL_PARSING_ENABLED="true",
            PARSER_SCHEDULER_INTERVAL_SEC="3600",
        ),
        tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_leading(gov)
        # The split gauges are sampled at another step of the tick than the scheduler's: a
        # scrape may fall between the two, so wait for both.
        fams = wait_for(
            lambda: (
                (f := scrape(url))
                and value(f, "scheduler_commands_total", mode="historical") == 2
                and value(f, "scheduler_channels", mode="paused") == 1
                and value(f, "split_commands_in_flight") == 1
                and f
            ),
            15,
            "two historical pushes and the split sampled",
        )
        assert value(fams, "scheduler_in_flight") == 2
        assert value(fams, "scheduler_channels", mode="historical") == 2
        assert (value(fams, "scheduler_ticks_total") or 0) >= 1
        assert value(fams, "split_parts", state="queued") == 3
        # One run completes (as a worker's ack would record it): its chat gets a lag.
        raw = client.lpop(keys.commands)
        cid = json.loads(raw)["command_id"]
        client.zadd(keys.completed, {cid: 1})
        chat = "@" + cid.split(":")[1]
        wait_for(
            lambda: (
                (v := value(scrape(url), "scheduler_channel_lag_seconds", chat=chat)) is not None
                and v < 30
            ),
            15,
            "the lag of the finished channel",
        )
        assert value(scrape(url), "scheduler_in_flight") == 1
    finally:
        gov.stop()
        gov.close()
