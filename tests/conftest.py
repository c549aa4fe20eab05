"""Shared fixtures: a real Redis for integration tests, settings factories, temp data roots."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.pushgateway import Pushgateway
from tests.pushgateway import available as pushgateway_available
from tests.redis_server import ContainerRedis, RedisServer, backend_description, new_redis_server


def pytest_report_header() -> str:
    """Which Redis the integration tests get: a process, or a container (TEST_REDIS=docker)."""
    return backend_description()


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServer | ContainerRedis]:
    """One Redis for the whole run on a free loopback port: a local process, or a container
    with TEST_REDIS=docker (the report header says which)."""
    server = new_redis_server(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | ContainerRedis) -> Iterator[str]:
    """The shared server's URL, emptied before each test."""
    import redis as syncredis

    client = syncredis.Redis.from_url(redis_server.url)
    client.flushall()
    client.script_flush()
    client.close()
    yield redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer | ContainerRedis]:
    """A Redis of the test's own, with AOF, that the test may kill and restart (a process, or a
    container with TEST_REDIS=docker)."""
    server = new_redis_server(tmp_path / "redis-private", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Settings read nothing from the developer's environment or .env: run in an empty dir."""
    for key in list(os.environ):
        if key.startswith(
            (
                "TELEGRAM_",
                "REDIS_",
                "SIM_",
                "DATA_DIR",
                "SESSIONS_DIR",
                "WORKER_ID",
                "METRICS_",
                "PUSHGATEWAY_",
                "LOKI_",
                "VICTORIA_",
                "DAY_TIMEZONE",
                "FETCH_",
                "LOG_",
            )
        ):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushgateway]:
    """One real Pushgateway for the whole run (skips the test when it is not installed)."""
    if not pushgateway_available():
        pytest.skip("prometheus-pushgateway is not installed")
    gateway = Pushgateway(tmp_path_factory.mktemp("pushgateway"))
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def gateway(pushgateway: Pushgateway) -> Pushgateway:
    """The shared Pushgateway, emptied before each test."""
    pushgateway.wipe()
    return pushgateway
