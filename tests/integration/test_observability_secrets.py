"""Secrets never leave the process: a full run (worker + governor, simulator, Redis with a
password, push and scrape) and then every output is searched for the configured secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as syncredis

from fleet.keys import Keys
from tests.integration.daemon_harness import Fleet, RedisView, all_files, base_env, fetch, wait_for
from tests.integration.obs_harness import GovernorProc, get, governor_env, wait_leading
from tests.pushgateway import Pushgateway
from tests.redis_server import RedisServer, free_port

API_HASH = "5ec7e7a1b2c3d4e5f60718293a4b5c6d"
PHONE = "+15550001234"
REDIS_PASSWORD = "r3dis-5ecret-pw-9876"
SECRETS = (API_HASH, PHONE, PHONE.lstrip("+"), REDIS_PASSWORD)


@pytest.fixture
def secured_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-secured", password=REDIS_PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


def test_no_secret_in_logs_metrics_health_pushgateway_events_or_files(
    secured_redis: RedisServer, tmp_path: Path, gateway: Pushgateway
) -> None:
    url = secured_redis.url
    assert REDIS_PASSWORD in url
    data = tmp_path / "data"
    common = {
        "METRICS_MODE": "both",
        "METRICS_HOST": "127.0.0.1",
        "PUSHGATEWAY_URL": gateway.url,
        "PUSH_INTERVAL_SECONDS": "0.3",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "TELEGRAM_API_ID": "123456",
        "TELEGRAM_API_HASH": API_HASH,
        "TELEGRAM_PHONE": PHONE,
        "WORKER_LEASE_SECONDS": "1.5",
    }
    worker_port, gov_port = free_port(), free_port()
    fleet = Fleet(base_env(url, data, tmp_path, RATE_LIMIT_STRATEGY="adaptive", **common), tmp_path)
    gov = GovernorProc(governor_env(url, "gov-secret", METRICS_PORT=gov_port, **common), tmp_path)
    rv = RedisView(url)
    outputs: dict[str, str] = {}
    try:
        wait_leading(gov)
        fleet.start(1, WORKER_ID="w-secret", METRICS_PORT=worker_port)
        rv.push(fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="sec-1"))
        rv.push({"command": "fetch", "chat": "@ru_python", "mode": "date", "date": "bad"})
        wait_for(lambda: "sec-1" in rv.completed_ids(), 20, "command completed")
        wait_for(lambda: len(rv.by_kind("failed")) >= 1, 10, "the invalid command rejected")
        wait_for(lambda: "w-secret" in gateway.groups(), 5, "worker pushed")
        for name, port in (("worker", worker_port), ("governor", gov_port)):
            for path in ("/metrics", "/health", "/health/details"):
                status, body = get(f"http://127.0.0.1:{port}{path}")
                assert status in (200, 503), (name, path, status)
                outputs[f"{name}{path}"] = body
        outputs["pushgateway /metrics"] = gateway.metrics_text()
        outputs["pushgateway api"] = gateway.api_text()
        outputs["events stream"] = json.dumps(rv.events())
        client = syncredis.Redis.from_url(url)
        try:
            outputs["dead letters"] = repr(client.lrange(Keys().dead_letters, 0, -1))
        finally:
            client.close()
    finally:
        rv.close()
        codes = fleet.stop_all()
        gov.stop()
        gov.close()
    assert codes == [0]
    outputs["worker stderr"] = fleet.workers[0].log()
    outputs["governor stderr"] = gov.log()
    for data_file in all_files(data):
        outputs[f"file {data_file.relative_to(data)}"] = data_file.read_text(errors="replace")
    assert any(name.startswith("file ") and "discussions_" in name for name in outputs)
    assert '"event": "command_completed"' in outputs["worker stderr"]
    for line in outputs["worker stderr"].splitlines() + outputs["governor stderr"].splitlines():
        json.loads(line)  # every line is JSON
    for name, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} found in {name}"
