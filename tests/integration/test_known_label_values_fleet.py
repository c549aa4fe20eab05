"""Issue 12 end to end: a simulator worker and a governor as real processes export their known
label sets at 0 before anything happens, and the worker's first FloodWait lands on the very
``flood_waits_total`` series the governor started at 0 for that worker's session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.gate import REQUEST_CLASSES
from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for
from tests.integration.obs_harness import GovernorProc, governor_env, scrape, wait_leading
from tests.redis_server import free_port
from worker.metrics import FETCH_ERROR_TYPES, RETRY_TARGETS


def _values(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): float(s.value)
        for family in scrape(url).values()
        for s in family.samples
        if s.name == name
    }


@pytest.fixture
def governor(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    port = free_port()
    gov = GovernorProc(
        governor_env(redis_url, "gov-known", METRICS_MODE="scrape", METRICS_PORT=port), tmp_path
    )
    gov.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        wait_leading(gov)
        yield gov
    finally:
        gov.stop()
        gov.close()


@pytest.mark.timeout(90)
def test_known_series_start_at_zero_and_the_first_flood_lands_on_the_sessions_series(
    redis_url: str, tmp_path: Path, governor: Any
) -> None:
    port = free_port()
    env = base_env(
        redis_url,
        tmp_path / "data",
        tmp_path,
        SIM_SESSIONS="acc-7",
        RATE_LIMIT_STRATEGY="adaptive",  # the shared gate reports floods to the governor
        SIM_HISTORY_REQUESTS="2",  # below the session bucket's burst: a FloodWait comes
        SIM_HISTORY_WINDOW_SECONDS="1",
        METRICS_MODE="scrape",
        METRICS_PORT=port,
    )
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        worker_url = f"http://127.0.0.1:{port}"
        errors = _values(worker_url, "fetch_errors_total")
        assert {errors[(("type", t),)] for t in FETCH_ERROR_TYPES} == {0.0}
        delays = _values(worker_url, "last_retry_delay_seconds")
        assert {delays[(("target", t),)] for t in RETRY_TARGETS} == {0.0}

        # The leader learns the worker's session from its heartbeat (sampled every 5 s).
        def at_zero() -> dict[tuple[tuple[str, str], ...], float]:
            return _values(governor.url, "flood_waits_total")

        expected = {(("request_class", c), ("session", "acc-7")): 0.0 for c in REQUEST_CLASSES}
        wait_for(lambda: at_zero() == expected, 20, "flood counters at 0 for acc-7", every=0.5)

        rv = RedisView(redis_url)
        try:
            rv.push(fetch("@ru_python", "2025-03-01", "2025-03-02", command_id="known-1"))
            wait_for(lambda: "known-1" in rv.completed_ids(), 60, "command completed")
        finally:
            rv.close()
        history = (("request_class", "history"), ("session", "acc-7"))
        floods = wait_for(
            lambda: (f := at_zero()).get(history, 0) >= 1 and f, 15, "the flood counted", every=0.5
        )
        assert set(floods) == set(expected), floods  # no series beyond the ones at 0
    finally:
        fleet.stop_all()


def test_the_governor_counts_its_log_drops_per_configured_log_server_from_zero(
    redis_url: str, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens: records wait in the queue, none dropped yet
    port = free_port()
    gov = GovernorProc(
        governor_env(
            redis_url,
            "gov-logs",
            METRICS_MODE="scrape",
            METRICS_PORT=port,
            LOKI_URL=f"http://127.0.0.1:{closed}",
        ),
        tmp_path,
    )
    try:
        wait_leading(gov)
        drops = _values(f"http://127.0.0.1:{port}", "log_records_dropped_total")
        assert drops == {(("sink", "loki"),): 0.0}
    finally:
        gov.stop()
        gov.close()
