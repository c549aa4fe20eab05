"""The worker's signal rules on a fake clock (no process, no sleeping): a repeat of the first
signal within 1 s is ignored (process managers often send the same stop twice); a second one
later forces the stop."""

from __future__ import annotations

import signal
from pathlib import Path

from fleet.clock import FakeClock
from worker.daemon import Daemon
from worker.settings import WorkerSettings


def _daemon(tmp_path: Path, clock: FakeClock) -> Daemon:
    settings = WorkerSettings(  # type: ignore[call-arg]
        telegram_backend="sim", health_file=tmp_path / "health", metrics_mode="off"
    )
    return Daemon(settings, install_signals=False, clock=clock)


async def test_a_repeated_signal_within_a_second_is_ignored_and_a_later_one_forces(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    d = _daemon(tmp_path, clock)
    d._on_signal(signal.SIGTERM)
    assert d.stop.is_set() and not d.force.is_set() and d.exit_reason == "SIGTERM"
    clock.advance(0.9)
    d._on_signal(signal.SIGTERM)
    assert not d.force.is_set()  # a double delivery, not a second request
    clock.advance(0.2)
    d._on_signal(signal.SIGINT)
    assert d.force.is_set()


async def test_the_first_signal_is_timed_on_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    clock.advance(1000.0)
    d = _daemon(tmp_path, clock)
    d._on_signal(signal.SIGINT)
    assert d._first_signal_at == 1000.0
