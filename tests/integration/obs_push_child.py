"""A stand-in for a daemon, run as a child process by the observability tests.

It wires logs + metrics + exporters the way ``python -m worker`` will, records a little work,
prints ``ready <url>`` on stdout, and on SIGTERM/SIGINT shuts down cleanly (last push, group
deleted). Usage: ``python obs_push_child.py <worker_id>``; settings come from the environment.
"""

from __future__ import annotations

import signal
import sys
import threading

from loguru import logger

from fleet.exporters import start_exporters
from fleet.logs import setup_logging
from fleet.metrics import WORKER_JOB
from fleet.settings import FleetSettings, load_settings
from worker.metrics import WorkerMetrics


def main() -> int:
    worker_id = sys.argv[1]
    settings = load_settings(FleetSettings)
    shipper = setup_logging(settings, worker_id=worker_id, component="worker")
    metrics = WorkerMetrics(chat_label_max=settings.metrics_chat_label_max)
    metrics.watch_log_shipper(shipper)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    metrics.messages_fetched_total.inc(7)
    metrics.observe_fetch("@ru_python", 3.15)
    metrics.set_fetch_lag("@ru_python", 42.0)
    metrics.record_retry("telegram", "timeout", 0.5)
    metrics.set_breaker_state("telegram", "closed")
    metrics.command_queue_length.set(3)
    exporters = start_exporters(
        settings,
        metrics.registry,
        job=WORKER_JOB,
        instance=worker_id,
        health=lambda: True,
        details=lambda: {"version": "test"},
    )
    print(f"ready {exporters.url or '-'}", flush=True)
    logger.info("child running", event="started")
    stop.wait()
    logger.info("child stopping", event="shutdown_started")
    exporters.stop(timeout=5.0)
    if shipper is not None:
        shipper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
