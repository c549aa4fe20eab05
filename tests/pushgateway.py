"""A real Pushgateway (Debian's ``prometheus-pushgateway``) on a free loopback port, for tests.

The ``pushgateway`` (one per run) and ``gateway`` (wiped before the test) fixtures in
``tests/conftest.py`` start it; tests skip when the binary is not installed.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.redis_server import free_port

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def available() -> bool:
    return Path(PUSHGATEWAY).exists()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


class Pushgateway:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(tmp / "pushgateway.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                PUSHGATEWAY,
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--persistence.file={tmp / 'persistence'}",
                "--web.enable-admin-api",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if not wait_until(self._ready, 10.0):
            self.stop()
            raise RuntimeError("pushgateway did not become ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def groups(self) -> dict[str, dict[str, Any]]:
        """instance -> group document, from the JSON API."""
        with urllib.request.urlopen(f"{self.url}/api/v1/metrics", timeout=2) as response:
            document = json.loads(response.read())
        return {g["labels"].get("instance", ""): g for g in document["data"]}

    def metrics_text(self) -> str:
        """Everything the Pushgateway exposes (what Prometheus would scrape)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            return str(response.read().decode())

    def api_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/api/v1/metrics", timeout=2) as response:
            return str(response.read().decode())

    def wipe(self) -> None:
        request = urllib.request.Request(f"{self.url}/api/v1/admin/wipe", method="PUT")
        with urllib.request.urlopen(request, timeout=2):
            pass

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
