"""Push mode against a real Pushgateway (Debian's ``prometheus-pushgateway`` on loopback)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from fleet.exporters import start_exporters
from fleet.logs import reset_logging, setup_logging
from fleet.metrics import WORKER_JOB
from fleet.push import Pusher, delete_group, list_groups, reap_dead_groups
from fleet.settings import ConfigError, FleetSettings
from tests.pushgateway import PUSHGATEWAY, Pushgateway, wait_until
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("obs_push_child.py")
INTERVAL_S = 0.2

pytestmark = [
    pytest.mark.skipif(not Path(PUSHGATEWAY).exists(), reason="no pushgateway"),
    pytest.mark.usefixtures("clean_env"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return wait_until(predicate, timeout)


def _settings(gateway_url: str, **overrides: Any) -> FleetSettings:
    return FleetSettings(
        _env_file=None,
        pushgateway_url=gateway_url,
        metrics_mode="push",
        push_interval_seconds=INTERVAL_S,
        **overrides,
    )


class Child:
    """``obs_push_child.py`` in its own process, pushing every INTERVAL_S."""

    def __init__(self, worker_id: str, gateway_url: str, tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METRICS_", "LOG_"))}
        env.update(
            METRICS_MODE="push",
            PUSHGATEWAY_URL=gateway_url,
            PUSH_INTERVAL_SECONDS=str(INTERVAL_S),
            REDIS_PASSWORD="child-redis-secret",
            PYTHONPATH=str(ROOT),
        )
        self.stderr_path = tmp / f"{worker_id}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), worker_id],
            env=env,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), self.stderr_path.read_text()

    def signal(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        try:
            code = self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self._stderr.close()
        return code


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str, str], Child]]:
    children: list[Child] = []

    def make(worker_id: str, gateway_url: str) -> Child:
        child = Child(worker_id, gateway_url, tmp_path)
        children.append(child)
        return child

    yield make
    for child in children:
        if child.proc.poll() is None:
            child.signal(signal.SIGKILL)


def _sample(group: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return list(group.get(metric, {}).get("metrics", []))


def test_worker_metrics_reach_pushgateway_under_its_worker_id(
    gateway: Pushgateway, spawn: Callable[[str, str], Child]
) -> None:
    spawn("worker-01", gateway.url)
    assert _wait_for(lambda: "worker-01" in gateway.groups())
    group = gateway.groups()["worker-01"]
    assert group["labels"] == {"job": WORKER_JOB, "instance": "worker-01"}
    fetched = _sample(group, "messages_fetched_total")
    assert fetched and float(fetched[0]["value"]) == 7
    assert fetched[0]["labels"]["instance"] == "worker-01"
    durations = group["fetch_duration_seconds"]["metrics"]
    assert durations[0]["labels"]["chat"] == "@ru_python"
    assert durations[0]["count"] == "1"
    assert float(_sample(group, "fetch_lag_seconds")[0]["value"]) == 42.0
    # Pushed on an interval, not once: the push time moves on.
    first = float(_sample(group, "push_time_seconds")[0]["value"])
    assert _wait_for(
        lambda: (
            float(_sample(gateway.groups()["worker-01"], "push_time_seconds")[0]["value"]) > first
        )
    )
    # No secret in what was pushed.
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=2) as response:
        assert b"child-redis-secret" not in response.read()


def test_clean_exit_deletes_own_group(
    gateway: Pushgateway, spawn: Callable[[str, str], Child]
) -> None:
    child = spawn("worker-clean", gateway.url)
    assert _wait_for(lambda: "worker-clean" in gateway.groups())
    assert child.signal(signal.SIGTERM) == 0
    assert "worker-clean" not in gateway.groups()
    assert "child-redis-secret" not in child.stderr_path.read_text()


def test_group_of_killed_worker_stays_until_delete_group(
    gateway: Pushgateway, spawn: Callable[[str, str], Child]
) -> None:
    child = spawn("worker-killed", gateway.url)
    assert _wait_for(lambda: "worker-killed" in gateway.groups())
    assert child.signal(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(3 * INTERVAL_S)
    assert "worker-killed" in gateway.groups(), "a killed worker cannot delete its own group"

    assert delete_group(_settings(gateway.url), WORKER_JOB, "worker-killed")
    assert "worker-killed" not in gateway.groups()


def test_reap_deletes_only_groups_of_dead_workers(
    gateway: Pushgateway, spawn: Callable[[str, str], Child]
) -> None:
    settings = _settings(gateway.url)
    live = WorkerMetrics()
    Pusher(
        url=gateway.url,
        job=WORKER_JOB,
        instance="worker-live",
        registry=live.registry,
        interval_s=INTERVAL_S,
    ).push_now()
    child = spawn("worker-dead", gateway.url)
    assert _wait_for(lambda: "worker-dead" in gateway.groups())
    child.signal(signal.SIGKILL)

    groups = list_groups(settings)
    assert groups is not None
    assert {g.instance for g in groups} == {"worker-live", "worker-dead"}
    assert all(g.last_push_unix and abs(g.last_push_unix - time.time()) < 30 for g in groups)

    # Recently pushed groups are spared (min_age_s), older ones of non-live workers go.
    assert (
        reap_dead_groups(settings, job=WORKER_JOB, live_instances={"worker-live"}, min_age_s=60)
        == []
    )
    deleted = reap_dead_groups(
        settings, job=WORKER_JOB, live_instances={"worker-live"}, min_age_s=0
    )
    assert deleted == ["worker-dead"]
    assert set(gateway.groups()) == {"worker-live"}


class _Recorder(BaseHTTPRequestHandler):
    """Records method, path and headers; answers 202 like the Pushgateway."""

    requests: list[tuple[str, str, dict[str, str]]]

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).requests.append((self.command, self.path, dict(self.headers)))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_POST = do_DELETE = _record

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def recorder() -> Iterator[tuple[ThreadingHTTPServer, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_push_and_delete_use_basic_auth_and_grouping_key(
    recorder: tuple[ThreadingHTTPServer, type[_Recorder]],
) -> None:
    server, handler = recorder
    url = f"http://127.0.0.1:{server.server_address[1]}"
    settings = _settings(url, pushgateway_username="ops", pushgateway_password="pg-secret")
    metrics = WorkerMetrics()
    exporters = start_exporters(settings, metrics.registry, job=WORKER_JOB, instance="w-7")
    assert exporters.server is None and exporters.pusher is not None
    assert _wait_for(lambda: len(handler.requests) >= 1)
    exporters.stop(timeout=2.0)

    methods = [m for m, _, _ in handler.requests]
    assert methods[-2:] == ["PUT", "DELETE"], "last push at exit, then the group is deleted"
    token = base64.b64encode(b"ops:pg-secret").decode()
    for _, path, headers in handler.requests:
        assert path == f"/metrics/job/{WORKER_JOB}/instance/w-7"
        assert headers["Authorization"] == f"Basic {token}"


def test_credentials_in_the_url_are_used_as_basic_auth(
    recorder: tuple[ThreadingHTTPServer, type[_Recorder]],
) -> None:
    server, handler = recorder
    settings = _settings(f"http://ops:p%40ss@127.0.0.1:{server.server_address[1]}")
    assert delete_group(settings, WORKER_JOB, "w-9")
    _, path, headers = handler.requests[-1]
    assert path == f"/metrics/job/{WORKER_JOB}/instance/w-9"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"ops:p@ss").decode()


def test_push_failures_are_logged_once_per_state_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _free_port()  # nothing listens here yet
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    setup_logging(
        FleetSettings(_env_file=None),
        worker_id="w-fail",
        component="worker",
    )
    try:
        pusher = Pusher(
            url=f"http://127.0.0.1:{port}",
            job=WORKER_JOB,
            instance="w-fail",
            registry=WorkerMetrics().registry,
            interval_s=0.05,
        ).start()
        assert _wait_for(lambda: pusher.failures >= 5)
        handler = type("Recorder", (_Recorder,), {"requests": []})
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            assert _wait_for(lambda: pusher.pushes >= 3)
            pusher.stop(timeout=2.0, delete_group=False)
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
    finally:
        reset_logging()
        logger.add(sys.__stderr__ or sys.stderr)  # loguru's own default, for other tests
    events = [json.loads(line).get("event") for line in stderr.getvalue().splitlines()]
    assert events.count("metrics_push_failing") == 1
    assert events.count("metrics_push_recovered") == 1


def test_push_mode_without_url_is_a_configuration_error() -> None:
    settings = FleetSettings(_env_file=None, metrics_mode="push")
    with pytest.raises(ConfigError, match="PUSHGATEWAY_URL"):
        start_exporters(settings, WorkerMetrics().registry, job=WORKER_JOB, instance="w")


def test_production_default_without_url_falls_back_to_scrape() -> None:
    settings = FleetSettings(
        _env_file=None,
        environment="production",
        metrics_host="127.0.0.1",
    )
    assert settings.effective_metrics_mode == "both"
    exporters = start_exporters(
        settings, WorkerMetrics().registry, job=WORKER_JOB, instance="w", port=0
    )
    try:
        assert exporters.pusher is None and exporters.server is not None
    finally:
        exporters.stop()


def test_stop_is_bounded_when_the_pushgateway_hangs() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        pusher = Pusher(
            url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            job=WORKER_JOB,
            instance="w-hang",
            registry=WorkerMetrics().registry,
            interval_s=0.05,
        ).start()
        time.sleep(0.1)
        started = time.monotonic()
        pusher.stop(timeout=1.0)
        assert time.monotonic() - started < 1.6
