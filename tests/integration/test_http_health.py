"""The metrics/health HTTP server over real sockets: ``/metrics``, ``/health``, details."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.exporters import Exporters, health_details, start_exporters
from fleet.metrics import GOVERNOR_JOB, RATE_LIMIT_HITS, RETRIES, WORKER_JOB
from fleet.settings import FleetSettings
from governor.metrics import GovernorMetrics
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.usefixtures("clean_env")

COMMON = {
    "retries_total",
    "rate_limit_hits_total",
    "last_retry_delay_seconds",
    "breaker_state",
    "breaker_open_total",
    "log_records_dropped_total",
}
WORKER = COMMON | {
    "fetch_duration_seconds",
    "fetch_lag_seconds",
    "deduplicated_messages_total",
    "messages_fetched_total",
    "fetch_errors_total",
    "command_queue_length",
    "token_wait_seconds",
}
GOVERNOR = COMMON | {
    "bucket_rate_per_second",
    "bucket_tokens",
    "flood_waits_total",
    "pauses_in_force",
    "live_workers",
    "dead_letters",
}
SECRET = "redis-pass-123"


def _settings(**overrides: Any) -> FleetSettings:
    values: dict[str, Any] = {
        "metrics_mode": "scrape",
        "metrics_host": "127.0.0.1",
        "redis_password": SECRET,
    }
    values.update(overrides)
    return FleetSettings(_env_file=None, **values)


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _names(text: str) -> set[str]:
    """Family names (counters with their ``_total``) plus sample names."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture
def serve() -> Iterator[Callable[..., Exporters]]:
    started: list[Exporters] = []

    def start(registry: Any, **kwargs: Any) -> Exporters:
        settings = kwargs.pop("settings", None) or _settings()
        kwargs.setdefault("port", 0)  # any free port
        exporters = start_exporters(settings, registry, **kwargs)
        started.append(exporters)
        return exporters

    yield start
    for exporters in started:
        exporters.stop()


def _one_command(metrics: WorkerMetrics) -> None:
    """What a worker records over one fetch command, roughly."""
    metrics.command_queue_length.set(4)
    metrics.token_wait_seconds.labels(request_class="history").observe(0.002)
    metrics.rate_limit_hits_total.labels(source="telegram", reason="FLOOD_WAIT").inc()
    metrics.record_retry("telegram", "timeout", 1.5)
    metrics.set_breaker_state("telegram", "open")
    metrics.set_breaker_state("telegram", "half_open")
    metrics.set_breaker_state("telegram", "closed")
    metrics.deduplicated_messages_total.labels(source="page_overlap").inc(2)
    metrics.messages_fetched_total.inc(271)
    metrics.fetch_errors_total.labels(type="TransientError").inc()
    metrics.observe_fetch("@ru_python", 3.15)
    metrics.set_fetch_lag("@ru_python", 3600)
    metrics.commands_total.labels(status="ok").inc()
    metrics.log_records_dropped_total.labels(sink="loki")


def test_worker_metrics_endpoint_exports_every_named_metric(
    serve: Callable[..., Exporters],
) -> None:
    metrics = WorkerMetrics(version="1.2.3")
    _one_command(metrics)
    exporters = serve(metrics.registry, job=WORKER_JOB, instance="w-1")
    status, content_type, body = _get(f"{exporters.url}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    names = _names(body)
    assert {n for n in WORKER if n not in names} == set()
    assert "messages_fetched_total 271.0" in body
    assert 'breaker_open_total{component="telegram"} 1.0' in body
    assert 'breaker_state{component="telegram"} 0.0' in body
    assert 'fetch_duration_seconds_bucket{chat="@ru_python",le="5.0"} 1.0' in body
    assert 'telegram_fetcher_build_info{component="worker",version="1.2.3"} 1.0' in body
    assert "process_resident_memory_bytes" in names
    assert SECRET not in body


def test_governor_metrics_endpoint_exports_every_named_metric(
    serve: Callable[..., Exporters],
) -> None:
    metrics = GovernorMetrics()
    metrics.bucket_rate_per_second.labels(request_class="history").set(0.9)
    metrics.bucket_tokens.labels(request_class="history").set(3)
    metrics.count_flood_wait("acc1", "history", 17)
    metrics.pauses_in_force.labels(request_class="history").set(1)
    metrics.live_workers.set(3)
    metrics.dead_letters.set(2)
    metrics.set_breaker_state("fleet", "closed")
    metrics.record_retry("redis", "ConnectionError", 0.5)
    metrics.rate_limit_hits_total.labels(source="telegram", reason="FLOOD_WAIT").inc()
    exporters = serve(metrics.registry, job=GOVERNOR_JOB, instance="gov-1")
    _, _, body = _get(f"{exporters.url}/metrics")
    names = _names(body)
    assert {n for n in GOVERNOR if n not in names} == set()
    assert 'flood_waits_total{request_class="history",session="acc1"} 1.0' in body
    assert 'flood_wait_seconds_total{request_class="history"} 17.0' in body


def test_fresh_registries_already_describe_every_metric(serve: Callable[..., Exporters]) -> None:
    # Before any work, dashboards and alerts still find the families (HELP/TYPE lines).
    for metrics, expected in ((WorkerMetrics(), WORKER), (GovernorMetrics(), GOVERNOR)):
        exporters = serve(metrics.registry, job=WORKER_JOB, instance="fresh")
        _, _, body = _get(f"{exporters.url}/metrics")
        families = {f.name for f in text_string_to_metric_families(body)}
        assert {n.removesuffix("_total") for n in expected} <= families


def test_openmetrics_is_served_when_asked_for(serve: Callable[..., Exporters]) -> None:
    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="w")
    status, content_type, body = _get(
        f"{exporters.url}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_chat_label_is_capped_with_an_other_bucket(serve: Callable[..., Exporters]) -> None:
    metrics = WorkerMetrics(chat_label_max=3)
    for i in range(10):
        metrics.observe_fetch(f"@chat{i}", 1.0)
        metrics.set_fetch_lag(f"@chat{i}", float(i))
    exporters = serve(metrics.registry, job=WORKER_JOB, instance="w")
    _, _, body = _get(f"{exporters.url}/metrics")
    chats = {
        s.labels["chat"]
        for f in text_string_to_metric_families(body)
        if f.name in ("fetch_duration_seconds", "fetch_lag_seconds")
        for s in f.samples
    }
    assert chats == {"@chat0", "@chat1", "@chat2", "other"}
    assert 'fetch_duration_seconds_count{chat="other"} 7.0' in body


def test_health_follows_the_callable(serve: Callable[..., Exporters]) -> None:
    state = {"healthy": False}
    exporters = serve(
        WorkerMetrics().registry, job=WORKER_JOB, instance="w", health=lambda: state["healthy"]
    )
    status, content_type, body = _get(f"{exporters.url}/health")
    assert (status, json.loads(body)) == (503, {"status": "unhealthy"})
    assert content_type == "application/json"
    state["healthy"] = True
    status, _, body = _get(f"{exporters.url}/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_a_raising_health_check_means_unhealthy(serve: Callable[..., Exporters]) -> None:
    def broken() -> bool:
        raise RuntimeError("redis gone")

    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="w", health=broken)
    assert _get(f"{exporters.url}/health")[0] == 503
    assert _get(f"{exporters.url}/metrics")[0] == 200


def test_health_details_is_json_and_masks_secrets(serve: Callable[..., Exporters]) -> None:
    def details() -> dict[str, object]:
        return health_details(
            version="0.1.0",
            telegram_connected=True,
            session="acc1",
            redis_ok=True,
            breaker="closed",
            current_command={"command_id": "c-1", "chat": "@ru_python"},
            last_success="2025-11-09T12:34:56Z",
            redis=f"redis://:{SECRET}@localhost:6379/0",
        )

    exporters = serve(
        WorkerMetrics().registry,
        job=WORKER_JOB,
        instance="w",
        health=lambda: True,
        details=details,
    )
    status, content_type, body = _get(f"{exporters.url}/health/details")
    assert status == 200 and content_type == "application/json"
    document = json.loads(body)
    assert document["version"] == "0.1.0"
    assert document["telegram"] == {"connected": True, "session": "acc1"}
    assert document["current_command"]["command_id"] == "c-1"
    assert document["healthy"] is True
    assert SECRET not in body and "***" in document["redis"]


def test_unknown_path_is_404(serve: Callable[..., Exporters]) -> None:
    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="w")
    assert _get(f"{exporters.url}/nope")[0] == 404


def test_a_slow_health_check_does_not_hold_up_scrapes(serve: Callable[..., Exporters]) -> None:
    release = threading.Event()

    def slow() -> bool:
        release.wait(5)
        return True

    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="w", health=slow)
    pending = threading.Thread(target=_get, args=(f"{exporters.url}/health",))
    pending.start()
    try:
        started = time.monotonic()
        assert _get(f"{exporters.url}/metrics")[0] == 200
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        pending.join()


def test_the_server_runs_whenever_a_port_is_set(serve: Callable[..., Exporters]) -> None:
    no_port = _settings(metrics_mode="scrape", metrics_port=0)
    exporters = serve(
        WorkerMetrics().registry, settings=no_port, port=None, job=WORKER_JOB, instance="w"
    )
    assert exporters.server is None and exporters.pusher is None

    with_port = _settings(metrics_mode="off", metrics_port=_free_port())
    exporters = serve(
        WorkerMetrics().registry, settings=with_port, port=None, job=WORKER_JOB, instance="w"
    )
    assert exporters.server is not None and exporters.pusher is None
    assert exporters.server.port == with_port.metrics_port
    assert _get(f"{exporters.url}/health")[0] == 200


def test_stop_closes_the_port(serve: Callable[..., Exporters]) -> None:
    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="w")
    url = exporters.url
    exporters.stop()
    exporters.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _get(f"{url}/health")


def test_known_counters_are_exported_at_zero_before_anything_happens(
    serve: Callable[..., Exporters],
) -> None:
    # Dashboards must tell "none yet" (0) from "not exported" (no series) from the first scrape.
    exporters = serve(WorkerMetrics().registry, job=WORKER_JOB, instance="fresh")
    _, _, body = _get(f"{exporters.url}/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    for source, reason in RATE_LIMIT_HITS:
        key = ("rate_limit_hits_total", (("reason", reason), ("source", source)))
        assert samples.get(key) == 0.0, key
    for target, reason in RETRIES:
        assert samples.get(("retries_total", (("reason", reason), ("target", target)))) == 0.0
    assert samples[("breaker_open_total", (("component", "telegram"),))] == 0.0
    assert samples[("commands_total", (("status", "failed"),))] == 0.0


def test_the_known_label_values_are_the_ones_the_code_records() -> None:
    from typing import get_args

    from fleet.bucket import Reason
    from worker.fleet_gate import BREAKER_COMPONENT
    from worker.rpcerrors import FLOOD, rpc_reason

    telegram = {r for s, r in RATE_LIMIT_HITS if s == "telegram"}
    bucket = {r for s, r in RATE_LIMIT_HITS if s == "bucket"}
    assert {rpc_reason(cls(request=None, capture=3)) for cls in FLOOD} == telegram
    refusals = set(get_args(Reason)) - {"ok", "probe", "breaker"}  # admitted, or not a rate limit
    assert bucket == refusals | {"local_pause"}
    assert BREAKER_COMPONENT == "telegram"


def test_the_start_up_log_names_the_address_the_socket_is_bound_on(
    serve: Callable[..., Exporters],
) -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    try:
        exporters = serve(
            WorkerMetrics().registry,
            settings=_settings(metrics_host="0.0.0.0"),
            job=WORKER_JOB,
            instance="w",
        )
    finally:
        logger.remove(sink)
    assert exporters.server is not None
    started = [line for line in lines if "metrics and health served on" in line]
    assert started == [f"metrics and health served on http://0.0.0.0:{exporters.server.port}\n"]
    assert _get(f"{exporters.url}/health")[0] == 200  # reachable on loopback all the same
