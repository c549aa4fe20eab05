"""Helpers for the end-to-end observability tests: a worker fleet and a governor as real
processes, both exporting metrics; scraping ``/metrics`` and ``/health/details``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon_harness import ROOT, wait_for

#: Every metric the issue names, per program (family names as the text parser reports them:
#: counters without ``_total``).
WORKER_METRICS = {
    "retries",
    "rate_limit_hits",
    "last_retry_delay_seconds",
    "breaker_state",
    "breaker_open",
    "fetch_duration_seconds",
    "fetch_lag_seconds",
    "deduplicated_messages",
    "messages_fetched",
    "fetch_errors",
    "command_queue_length",
    "token_wait_seconds",
}
#: The governor's: token waits are measured where they happen, in the workers' gate.
GOVERNOR_METRICS = {
    "retries",
    "rate_limit_hits",
    "last_retry_delay_seconds",
    "breaker_state",
    "breaker_open",
    "bucket_rate_per_second",
    "bucket_tokens",
    "flood_waits",
    "pauses_in_force",
    "live_workers",
    "dead_letters",
}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def scrape(base_url: str) -> dict[str, Any]:
    """``/metrics`` parsed by the Prometheus text parser: family name -> family."""
    status, text = get(f"{base_url}/metrics")
    assert status == 200, text
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> list[Any]:
    return list(families[name].samples) if name in families else []


def governor_env(redis_url: str, gid: str, **extra: object) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("REDIS_", "GOVERNOR_", "SCHEDULE_", "AIMD_", "METRICS_", "LOG_", "TELEGRAM_")
        )
    }
    env.update(
        REDIS_URL=redis_url,
        GOVERNOR_ID=gid,
        GOVERNOR_TICK_SECONDS="0.2",
        GOVERNOR_LEASE_SECONDS="1.0",
        LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class GovernorProc:
    """One ``python -m governor`` with its stderr in a file."""

    def __init__(self, env: dict[str, str], tmp: Path, name: str = "governor") -> None:
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "governor"],
            cwd=tmp,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def wait_leading(gov: GovernorProc, timeout: float = 15) -> None:
    wait_for(
        lambda: "leads now" in gov.log() or gov.proc.poll() is not None, timeout, "governor leads"
    )
    assert gov.proc.poll() is None, gov.log()
