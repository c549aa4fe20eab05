"""Fixtures of the tests that run real worker processes (see ``daemon_harness``).

``fleet`` starts workers with the environment of ``fleet_env``; a test module that needs a
different environment (a shorter grace period, a Pushgateway) overrides ``fleet_env`` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(redis_url, data_dir, tmp_path)


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fleet_env, tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def rv(redis_url: str) -> Iterator[RedisView]:
    view = RedisView(redis_url)
    try:
        yield view
    finally:
        view.close()
