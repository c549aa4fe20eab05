"""docker-compose.yml as the README has a user run it, on a fresh clone with the simulator:
``cp .env.example .env`` plus the simulator keys, ``docker compose up --build --scale worker=3``,
commands from the host CLI and through ``docker compose exec``, files in the data volume, events,
/metrics scraped by the Compose Prometheus, Pushgateway groups, scaling 3 -> 1 -> 4 -> 3, and
``down -v`` leaving no container or volume.

Runs only where a Docker engine with Compose v2 and the base images is up (``.ci/docker.sh``
prepares one); otherwise it is skipped with the reason. The test appends free host ports to
``.env`` (Compose reads them for ``${…_PUBLISH_PORT}``) so that parallel runs never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_harness import wait_for
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGES = (
    os.environ.get("PYTHON_IMAGE", "python:3.11-slim"),
    os.environ.get("REDIS_IMAGE", "redis:7"),
    os.environ.get("PUSHGATEWAY_IMAGE", "prom/pushgateway:v1.9.0"),
    os.environ.get("PROMETHEUS_IMAGE", "prom/prometheus:v2.53.0"),
)


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client (run .ci/docker.sh)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return "no Docker engine answers (run .ci/docker.sh)"
    version = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30
    )
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2."):
        return "Compose v2 is missing (run .ci/docker.sh)"
    for image in IMAGES:
        found = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, timeout=30
        )
        if found.returncode != 0:
            return f"base image {image} is missing (run .ci/docker.sh)"
    return None


PROBLEM = _engine_problem() if os.environ.get("TEST_DOCKER", "1") != "0" else "TEST_DOCKER=0"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROBLEM is not None, reason=f"Compose smoke test: {PROBLEM}"),
]


class Project:
    def __init__(self, clone: Path, name: str) -> None:
        self.clone = clone
        self.name = name
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "METRICS_", "PUSHGATEWAY_"))
        }
        self.env["PYTHONPATH"] = str(clone)

    def compose(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            ["docker", "compose", "-p", self.name, *args],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"compose {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def cli(self, *args: str, timeout: float = 180) -> str:
        """The host's own CLI, configured by the clone's .env (REDIS_PORT = the published one)."""
        done = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def cli_start(self, *args: str) -> subprocess.Popen[str]:
        """:meth:`cli` in the background; :meth:`cli_finish` waits for it and checks it."""
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=self.clone,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli_finish(self, proc: subprocess.Popen[str], timeout: float) -> str:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"{' '.join(map(str, proc.args))}: timed out: {out}{err}"
            ) from None
        assert proc.returncode == 0, f"{' '.join(map(str, proc.args))}: {out}{err}"
        return out

    def workers(self) -> list[str]:
        out = self.compose("ps", "--format", "json", "worker")
        rows = [json.loads(ln) for ln in out.splitlines() if ln.strip().startswith("{")]
        if not rows and out.strip().startswith("["):
            rows = json.loads(out)
        return [r["Name"] for r in rows if r.get("State") == "running"]

    def leftovers(self) -> tuple[str, str]:
        label = f"label=com.docker.compose.project={self.name}"
        containers = subprocess.run(
            ["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        volumes = subprocess.run(
            ["docker", "volume", "ls", "-q", "--filter", label],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        return containers, volumes


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def dashboard_queries(via: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard panel, with its variables as Grafana fills them
    for "All" and the given ``$via``."""
    board = json.loads((ROOT / "deploy/grafana/dashboards/telegram-fetcher.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = str(target.get("expr", ""))
            for name, value in (
                ("$__rate_interval", "1m"),
                ("$via", via),
                ("$instance", ".*"),
                ("$chat", ".*"),
            ):
                expr = expr.replace(name, value)
            if expr:
                out.append((str(panel.get("title")), expr))
    return out


def _prom(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        return list(_get(url)["data"]["result"])
    except OSError:
        return []


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Project, dict[str, int]]]:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    ports = {
        "REDIS": free_port(),
        "PUSHGATEWAY": free_port(),
        "PROMETHEUS": free_port(),
    }
    # The README's steps: .env from the example, then the simulator keys.
    shutil.copy(clone / ".env.example", clone / ".env")
    with open(clone / ".env", "a", encoding="utf-8") as fh:
        fh.write("TELEGRAM_BACKEND=sim\nSIM_SESSIONS=acc1,acc2,acc3\n")
        for key, port in ports.items():
            fh.write(f"{key}_PUBLISH_PORT={port}\n")
        fh.write(f"REDIS_PORT={ports['REDIS']}\nPUSH_INTERVAL_SECONDS=2\n")
    p = Project(clone, f"tfsmoke{os.getpid()}")
    try:
        yield p, ports
    finally:
        subprocess.run(
            ["docker", "compose", "-p", p.name, "down", "-v", "--remove-orphans", "-t", "40"],
            cwd=clone,
            env=p.env,
            capture_output=True,
            timeout=300,
        )


@pytest.mark.timeout(540)
def test_compose_fleet_builds_serves_scales_and_leaves_nothing(
    project: tuple[Project, dict[str, int]],
) -> None:
    p, ports = project
    started = time.monotonic()
    p.compose("up", "-d", "--build", "--scale", "worker=3", "--wait", "--wait-timeout", "240")
    build_seconds = time.monotonic() - started
    assert len(p.workers()) == 3

    # A command from the host CLI (Redis published on loopback) and, meanwhile, one through
    # exec: each waits for its own command only, so neither waits for the other.
    host_send = p.cli_start("worker", "send", "--chat", "@smoke_host", "--days", "2",
                            "--command-id", "host-1", "--wait", "--timeout", "120")  # fmt: skip
    try:
        inside = p.compose("exec", "-T", "governor", "python", "-m", "worker", "send", "--chat",
                           "@smoke_exec", "--days", "2", "--command-id", "exec-1", "--wait",
                           "--timeout", "120")  # fmt: skip
        host = p.cli_finish(host_send, 180)
    finally:
        if host_send.poll() is None:
            host_send.kill()
            host_send.communicate()
    assert "completed" in inside, inside
    assert "completed" in host, host
    files = p.compose("exec", "-T", "--index", "1", "worker", "find", "/app/data", "-name",
                      "discussions_*.json")  # fmt: skip
    assert files.count("/smoke_host/") == 2 and files.count("/smoke_exec/") == 2, files
    events = p.cli("worker", "listen", "--replay", "1000", "--json", "--timeout", "2")
    completed = {
        e["command_id"]
        for e in map(json.loads, events.splitlines())
        if e.get("event") == "completed"
    }
    assert {"host-1", "exec-1"} <= completed

    # /metrics of every worker and the governor, scraped by the Compose Prometheus.
    wait_for(
        lambda: (
            len(_prom(ports["PROMETHEUS"], 'up{job="telegram-fetcher-worker"} == 1')) == 3
            and _prom(ports["PROMETHEUS"], 'up{job="telegram-fetcher-governor"} == 1')
        ),
        120,
        "Prometheus scraping 3 workers and the governor",
        every=2,
    )

    # Every dashboard panel's query returns data, on both paths (METRICS_MODE=both by default),
    # although no retry, FloodWait, error or dropped log record happened here: label sets known
    # in advance are exported at 0 from the start (issue 12), and the one panel whose labels
    # cannot exist yet (log drops with no log server configured) says 0 by its query.
    def empty_panels() -> list[str]:
        return [
            f"{via}: {title}: {expr}"
            for via in ("scrape", "pushgateway")
            for title, expr in dashboard_queries(via)
            if not _prom(ports["PROMETHEUS"], expr)
        ]

    try:
        wait_for(lambda: not empty_panels(), 90, "data in the dashboard's panels", every=2)
    except AssertionError:
        pytest.fail("dashboard panels without data:\n" + "\n".join(empty_panels()))
    panels = 2 * len(dashboard_queries("scrape"))
    print(f"dashboard: {panels}/{panels} panel queries return data")

    # The Pushgateway fed in the default configuration: a group per worker and the governor.
    groups = _get(f"http://127.0.0.1:{ports['PUSHGATEWAY']}/api/v1/metrics")["data"]
    jobs = [g["labels"].get("job") for g in groups]
    assert jobs.count("telegram-fetcher-worker") >= 3 and "telegram-fetcher-governor" in jobs

    # 3 -> 1 while two longer commands run: both finish (on the survivor if need be).
    for n in (1, 2):
        p.cli("worker", "send", "--chat", f"@smoke_long{n}", "--days", "8", "--command-id",
              f"long-{n}")  # fmt: skip
    p.compose("up", "-d", "--scale", "worker=1", "--no-recreate")
    assert len(p.workers()) == 1
    for n in (1, 2):
        out = p.cli("worker", "listen", "--command-id", f"long-{n}", "--replay", "1000",
                    "--until-terminal", "--timeout", "150", timeout=200)  # fmt: skip
        assert "completed" in out, out

    # 1 -> 4: three sessions, so the fourth waits and says why.
    p.compose("up", "-d", "--scale", "worker=4", "--no-recreate")
    wait_for(
        lambda: "no free telegram session" in p.compose("logs", "worker"), 60, "a waiting worker"
    )
    assert len(p.workers()) == 4
    p.compose("up", "-d", "--scale", "worker=3", "--no-recreate")
    assert len(p.workers()) == 3

    p.compose("down", "-v", "--remove-orphans", "-t", "40")
    assert p.leftovers() == ("", ""), p.leftovers()
    total = time.monotonic() - started
    print(f"compose smoke: up --build in {build_seconds:.0f}s, whole test {total:.0f}s")
