"""SIGTERM at any instant of a worker's start-up: it always exits 0 within the grace period.

A signal that lands while the heartbeat's Redis call is completing used to be lost (Python
3.11's ``wait_for`` drops a cancellation that races its inner future), and the shutdown waited
for the heartbeat with no timeout, so the worker kept renewing its leases forever. Real
processes, real signals, at random instants from the moment the worker's signal handlers are
installed ("worker starting") until a little after it is ready.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, Worker, base_env

pytestmark = pytest.mark.slow
GRACE_S = 2
TRIALS = 30
AT_ONCE = 5  # processes starting together (2 cores shared: more only slows every start)
SESSIONS = ",".join(f"sim-{i}" for i in range(1, TRIALS + 1))


@pytest.fixture
def fleet_env(redis_url: str, data_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(
        redis_url,
        data_dir,
        tmp_path,
        SHUTDOWN_GRACE_SECONDS=GRACE_S,
        SIM_SESSIONS=SESSIONS,
        # The heartbeat runs every lease/3: a short lease puts many Redis calls in the window.
        WORKER_LEASE_SECONDS=0.6,
        LOG_LEVEL="DEBUG",
    )


def _started(w: Worker) -> bool:
    return "worker starting" in w.log() or w.proc.poll() is not None


def test_sigterm_at_random_instants_of_start_up_always_exits_0_within_the_grace(
    fleet: Fleet,
) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    began = time.monotonic()
    results: list[tuple[str, float, int | None, float]] = []  # name, delay, code, seconds
    for _batch in range(TRIALS // AT_ONCE):
        workers = fleet.start(AT_ONCE, wait_ready=False)
        pending = {w.name: (w, rng.uniform(0.0, 0.8)) for w in workers}
        started: dict[str, float] = {}
        signalled: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for name, (w, delay) in list(pending.items()):
                if name not in started:
                    if _started(w):
                        started[name] = now
                    continue
                if name not in signalled:
                    if now - started[name] >= delay:
                        w.signal(signal.SIGTERM)
                        signalled[name] = now
                    continue
                code = w.proc.poll()
                if code is not None or now - signalled[name] > GRACE_S + 3:
                    results.append((name, delay, code, now - signalled[name]))
                    if code is None:
                        w.kill()
                    del pending[name]
            time.sleep(0.01)
        assert not pending, f"workers never started: {sorted(pending)}"
    bad = [r for r in results if r[2] != 0 or r[3] > GRACE_S + 1]
    detail = "\n".join(
        f"{name}: SIGTERM {delay:.2f}s after start, exit {code} after {took:.2f}s"
        for name, delay, code, took in bad
    )
    assert len(results) == TRIALS
    assert not bad, f"seed {seed}: {len(bad)} of {TRIALS} did not exit 0 in time:\n{detail}"
    assert time.monotonic() - began < 60
