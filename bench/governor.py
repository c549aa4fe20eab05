"""Benchmark: rate policies side by side on a matrix of simulated worlds with hidden limits.

    python bench/governor.py --scenario NAME|all --seed N [--seconds S] [--out FILE.json]
                             [--policies telethon,telethon_paged,fixed,governor] [--plot DIR]

Each scenario is a world built from the seed: hidden limits drawn within ranges (so no constant
can be tuned to one world), per account (a sliding window of K requests per W s, each account
its own) and optionally fleet-wide (one window shared by every account, kept atomically on a
Redis of the simulator's own), the configured rates the fleet starts from, and a change
halfway (written to the simulator's limits hash at runtime). In the same run, one policy after
the other on fresh Redis state, worker processes (``bench/_bench_worker.py``) page through
history over the simulator for S seconds:

- ``telethon``: plain Telethon with its defaults: a FloodWait of N <= 60 s is slept for exactly
  N s and the request re-sent; ``iter_messages(wait_time=0)``;
- ``telethon_paged``: the same with Telethon's own 1 s page pause (``iter_messages`` without a
  limit);
- ``fixed``: plain Telethon behind a per-worker limiter at the configured rate (the per-account
  rate, or the fleet rate's share per worker if that is lower);
- ``governor``: this project's worker (:class:`worker.fleet_gate.FleetGate`) plus a
  ``python -m governor`` process that is leading before the fleet starts, as deployed.

Scenarios (``--scenario all`` runs them in this order):

========== =====================================================================================
drop       3 workers, the fleet limit binds (70–90% of the accounts' sum); both drop 40% halfway
window30   3 workers, per-account windows of 25–35 requests per 25–35 s, no fleet limit
hetero     3 workers, no fleet limit, one account 5× slower than the other two
high       as ``drop`` without the drop, configured 5× too high
low        as ``drop`` without the drop, configured 5× too low
rise       4 workers, the fleet limit binds (50–65% of the accounts' sum) and rises 50% halfway
workers12  12 workers, the fleet limit binds (60–85% of the accounts' sum)
========== =====================================================================================

Outside ``high``/``low`` the configured rates are the truth × 0.8–1.25 (an operator's guess).

Reported per scenario and policy: ``share`` = history requests answered ÷ what the limits
allowed (per phase: the sum over accounts of what each one's window allows, capped by the
fleet's: K per window started in the first phase, which starts idle, K / W per second after);
``acct`` = the lowest account's answered ÷ its own limit (what it could have had alone);
FloodWaits; ``settle`` = FloodWaits from a drop until 5 s without any; ``lost`` = worker-seconds
asleep because of FloodWaits (a worker's own sleeps plus the fleet holds a flood imposed on
the others); ``t90`` = seconds from the start and from the change until the answered rate over
a sliding span (2 s, or the longest hidden window) first reaches 90% of what the limits allow.
The JSON keeps per-second answered counts per account and every FloodWait, so ``--plot DIR``
(matplotlib) draws one PNG per scenario from it, or later: ``--replot FILE.json --plot DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fleet.keys import Keys  # noqa: E402

SETTLE_QUIET_S = 5.0
POLICIES = ("telethon", "telethon_paged", "fixed", "governor")
LABELS = {
    "telethon": "Telethon exact N",
    "telethon_paged": "Telethon + 1 s pages",
    "fixed": "fixed per-worker",
    "governor": "governor",
}
SCENARIOS = ("drop", "window30", "hetero", "high", "low", "rise", "workers12")
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Phase:
    """The hidden limits in force: per account (K requests per W s each), fleet (0: none)."""

    accounts: tuple[tuple[int, float], ...]
    fleet: tuple[int, float] = (0, 1.0)

    def account_rates(self) -> list[float]:
        return [k / w if k > 0 else float("inf") for k, w in self.accounts]

    def allowed(self) -> float:
        """Requests/s the limits allow the whole fleet: the accounts' sum, capped by the fleet."""
        total = sum(self.account_rates())
        if self.fleet[0] > 0:
            total = min(total, self.fleet[0] / self.fleet[1])
        return total

    def account_allows(self, i: int, seconds: float, from_idle: bool) -> float:
        """Requests account ``i``'s window allows within ``seconds``. From idle (the first
        phase) a window-type limit allows its K at once and K per window started after (a 30 s
        run of a 28 s window allows 2 K); later phases start with a window already in use, so
        K / W per second."""
        k, w = self.accounts[i]
        if k <= 0:
            return 1e12
        return k * math.ceil(seconds / w - 1e-9) if from_idle else k / w * seconds

    def allows(self, seconds: float, from_idle: bool) -> float:
        """Requests the limits allow the whole fleet within ``seconds`` of this phase."""
        n = len(self.accounts)
        total = sum(self.account_allows(i, seconds, from_idle) for i in range(n))
        f, wf = self.fleet
        if f > 0:
            fleet = f * math.ceil(seconds / wf - 1e-9) if from_idle else f / wf * seconds
            total = min(total, fleet)
        return total


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    workers: int
    phases: tuple[Phase, ...]  # the second (if any) starts halfway
    session_rate: float  # configured RATE_HISTORY_PER_SECOND
    fleet_rate: float  # configured FLEET_RATE_HISTORY_PER_SECOND
    session_burst: int = 2
    notes: dict[str, Any] = field(default_factory=dict)

    def fixed_rate(self) -> float:
        return min(self.session_rate, self.fleet_rate / self.workers)

    def longest_window(self) -> float:
        windows = [w for p in self.phases for _, w in p.accounts]
        windows += [p.fleet[1] for p in self.phases if p.fleet[0] > 0]
        return max(windows)


def _binding(rng: random.Random, name: str, seed: int, workers: int, share: tuple[float, float],
             guess: float | None = None) -> Scenario:  # fmt: skip
    """Per-account limits a/s on windows of W s, a fleet limit binding at ``share`` of their sum."""
    window = round(rng.uniform(1.5, 3.0), 1)
    per_account = rng.uniform(8.0, 12.0) if workers <= 4 else rng.uniform(3.0, 5.0)
    k = max(2, round(per_account * window))
    fleet_window = round(rng.uniform(1.5, 3.0), 1)
    fleet_rate = rng.uniform(*share) * workers * k / window
    f = max(2, round(fleet_rate * fleet_window))
    phase = Phase(((k, window),) * workers, (f, fleet_window))
    m = guess if guess is not None else rng.uniform(0.8, 1.25)
    return Scenario(
        name, seed, workers, (phase,), session_rate=m * k / window, fleet_rate=m * f / fleet_window,
        notes={"configured_times_truth": round(m, 3)},
    )  # fmt: skip


def make_scenario(name: str, seed: int) -> Scenario:
    rng = random.Random(f"{name}:{seed}")
    if name == "drop":
        s = _binding(rng, name, seed, 3, (0.7, 0.9))
        p = s.phases[0]
        k, w = p.accounts[0]
        dropped = Phase(((round(0.6 * k), w),) * s.workers, (round(0.6 * p.fleet[0]), p.fleet[1]))
        return replace(s, phases=(p, dropped))
    if name in ("high", "low"):
        return _binding(rng, name, seed, 3, (0.7, 0.9), 5.0 if name == "high" else 0.2)
    if name == "rise":
        s = _binding(rng, name, seed, 4, (0.5, 0.65))
        p = s.phases[0]
        return replace(s, phases=(p, replace(p, fleet=(round(1.5 * p.fleet[0]), p.fleet[1]))))
    if name == "workers12":
        return _binding(rng, name, seed, 12, (0.6, 0.85))
    if name == "window30":
        k, w = rng.randint(25, 35), round(rng.uniform(25.0, 35.0), 1)
        m = rng.uniform(0.8, 1.25)
        return Scenario(
            name, seed, 3, (Phase(((k, w),) * 3),), session_rate=m * k / w,
            fleet_rate=3 * m * k / w, notes={"configured_times_truth": round(m, 3)},
        )  # fmt: skip
    if name == "hetero":
        window = 2.0
        k = round(rng.uniform(6.0, 10.0) * window)
        slow = rng.randrange(3)
        accounts = tuple((max(1, round(k / 5)) if i == slow else k, window) for i in range(3))
        m = rng.uniform(0.8, 1.25)
        return Scenario(
            name, seed, 3, (Phase(accounts),), session_rate=m * k / window,
            fleet_rate=3 * m * k / window,
            notes={"configured_times_truth": round(m, 3), "slow_account": f"w{slow + 1}"},
        )  # fmt: skip
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        # Longer than any single blocking call made on it (BLPOP waits at most 1 s at a time).
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _gate_settings(sc: Scenario) -> dict[str, Any]:
    return {
        "rate_history_per_second": sc.session_rate,
        "rate_history_burst": sc.session_burst,
        "fleet_rate_history_per_second": sc.fleet_rate,
        "fleet_rate_history_burst": 1,  # the default
    }


def _governor_env(gov: _Redis, prefix: str, sc: Scenario, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GOVERNOR_"))}
    env.update(
        {
            "REDIS_URL": gov.url,
            "REDIS_KEY_PREFIX": prefix,
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "INFO",
            "METRICS_MODE": "off",
            "GOVERNOR_ID": "bench-governor",
            "PYTHONPATH": str(ROOT),
        }
    )
    for key, value in _gate_settings(sc).items():
        env[key.upper()] = str(value)
    env.update(extra)
    return env


def _limits_hash(phase: Phase, first: Phase) -> dict[str, Any]:
    """The simulator's limits hash for ``phase``. Per-account limits start in each worker's own
    settings (they may differ); the hash overrides them only once they change (then alike)."""
    mapping: dict[str, Any] = {
        "fleet_requests": phase.fleet[0],
        "fleet_window_seconds": phase.fleet[1],
    }
    if phase.accounts != first.accounts:
        mapping["history_requests"] = phase.accounts[0][0]
        mapping["history_window_seconds"] = phase.accounts[0][1]
    return mapping


def _wait_ready(client: redis.Redis, key: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """BLPOP one second at a time (never longer than the client's socket timeout), failing
    early and readably if a worker died while starting."""
    ready = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready < len(procs):
        if client.blpop([key], timeout=1) is not None:
            ready += 1
            continue
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            err = (dead[0].stderr.read() if dead[0].stderr else b"").decode(errors="replace")
            raise RuntimeError(f"a bench worker exited while starting: {err.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {ready} of {len(procs)} workers started within "
                               f"{READY_TIMEOUT_S:g} s")  # fmt: skip


@dataclass
class _Run:
    """One policy's run in progress: its processes and where it writes."""

    sc: Scenario
    policy: str
    seconds: float
    gov: _Redis
    sim: _Redis
    limits_key: str
    log_path: Path
    workers: list[subprocess.Popen[bytes]]
    governor: subprocess.Popen[bytes] | None
    gov_log: Any
    ready_key: str
    go_key: str
    changes: list[float] = field(default_factory=list)

    def kill(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.governor is not None and self.governor.poll() is None:
            self.governor.send_signal(signal.SIGTERM)
            self.governor.wait(30)
        self.gov_log.close()


def run_policies(
    sc: Scenario,
    policies: list[str],
    seconds: float,
    servers: dict[str, tuple[_Redis, _Redis]],
    workdir: Path,
    extra: dict[str, str],
    *,
    parallel: bool,
) -> dict[str, dict[str, Any]]:
    """Run ``policies`` on ``sc``: all at once (``parallel``: each on its own two Redis
    servers, started together and changed together, so every policy meets the same moments)
    or one after the other."""
    if not parallel:
        out = {}
        for policy in policies:
            print(f"{sc.name} seed {sc.seed}: {LABELS[policy]} for {seconds:g} s ...",
                  file=sys.stderr)  # fmt: skip
            run = _start(sc, policy, seconds, *servers[policy], workdir, extra)
            out[policy] = _finish(run, _go([run]))
        return out
    print(f"{sc.name} seed {sc.seed}: {', '.join(LABELS[p] for p in policies)} side by side "
          f"for {seconds:g} s ...", file=sys.stderr)  # fmt: skip
    runs: list[_Run] = []
    try:
        for policy in policies:
            runs.append(_start(sc, policy, seconds, *servers[policy], workdir, extra))
        changes = _go(runs)
        return {run.policy: _finish(run, changes) for run in runs}
    finally:
        for run in runs:
            run.kill()


def _go(runs: list[_Run]) -> list[float]:
    """Wait until every worker of every run is ready, then let the limits change at the same
    moments for all of them (the start is when the last worker became ready)."""
    for run in runs:
        _wait_ready(run.gov.client(), run.ready_key, run.workers)
    sc, seconds = runs[0].sc, runs[0].seconds
    for run in runs:
        run.gov.client().rpush(run.go_key, *["go"] * len(run.workers))
    t_start = time.time()
    changes = [t_start]
    first = sc.phases[0]
    for n, phase in enumerate(sc.phases[1:], start=1):
        at = t_start + seconds * n / len(sc.phases)
        time.sleep(max(0.0, at - time.time()))
        for run in runs:
            run.sim.client().hset(run.limits_key, mapping=_limits_hash(phase, first))
        changes.append(time.time())
    return changes


def _start(
    sc: Scenario,
    policy: str,
    seconds: float,
    gov: _Redis,
    sim: _Redis,
    workdir: Path,
    extra: dict[str, str],
) -> _Run:
    gov.client().flushall()
    sim.client().flushall()
    prefix = f"bench_{policy}:"
    sim_prefix = f"sim_{policy}:"
    limits_key = f"{sim_prefix}sim:{{sim}}:limits"
    first = sc.phases[0]
    sim.client().hset(limits_key, mapping=_limits_hash(first, first))
    log_path = workdir / f"requests_{sc.name}_seed{sc.seed}_{policy}.jsonl"
    log_path.unlink(missing_ok=True)
    governor: subprocess.Popen[bytes] | None = None
    gov_log = open(workdir / f"governor_{sc.name}_seed{sc.seed}_{policy}.log", "wb")  # noqa: SIM115
    if policy == "governor":
        governor = subprocess.Popen(
            [sys.executable, "-m", "governor", "run"],
            cwd=workdir,
            env=_governor_env(gov, prefix, sc, extra),
            stdout=gov_log,
            stderr=subprocess.STDOUT,
        )
        leader_key = Keys(prefix).governor_leader
        deadline = time.monotonic() + 30
        while not gov.client().exists(leader_key):
            if time.monotonic() > deadline or governor.poll() is not None:
                raise RuntimeError("the governor did not take the leader lease")
            time.sleep(0.05)
        time.sleep(2.0)
    ready_key = f"{prefix}bench:ready"
    workers = []
    for i in range(sc.workers):
        k, w = first.accounts[i]
        cfg = {
            "session": f"w{i + 1}",
            "policy": policy,
            "seconds": seconds,
            "redis_url": gov.url,
            "prefix": prefix,
            "sim_redis_url": sim.url,
            "sim_prefix": sim_prefix,
            "request_log": str(log_path),
            "fixed_rate": sc.fixed_rate(),
            "settings": {
                **_gate_settings(sc),
                # The governor's workers read the same settings as the governor.
                **({key.lower(): v for key, v in extra.items()} if policy == "governor" else {}),
                "sim_history_requests": k,
                "sim_history_window_seconds": w,
            },
            "ready_key": ready_key,
            "go_key": f"{prefix}bench:go",
            "latency_ms": 10.0,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "_bench_worker.py"), json.dumps(cfg)],
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return _Run(sc, policy, seconds, gov, sim, limits_key, log_path, workers, governor, gov_log,
                ready_key, f"{prefix}bench:go")  # fmt: skip


def _finish(run: _Run, changes: list[float]) -> dict[str, Any]:
    """Collect every worker's statistics (they stop by themselves after ``seconds``)."""
    try:
        stats = []
        for p in run.workers:
            out, err = p.communicate(timeout=run.seconds + 60)
            lines = out.decode().strip().splitlines()
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"a bench worker failed: {err.decode()[-2000:]}")
            stats.append(json.loads(lines[-1]))
    finally:
        run.kill()
    return summarize(run.sc, run.policy, run.seconds, stats, run.log_path, changes)


def _read_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("}\n") or line.endswith("}"):
                rows.append(json.loads(line))
    return rows


def summarize(
    sc: Scenario,
    policy: str,
    seconds: float,
    stats: list[dict[str, Any]],
    log_path: Path,
    changes: list[float],
) -> dict[str, Any]:
    t_start, t_end = changes[0], changes[0] + seconds
    bounds = [*changes, t_end]
    sessions = [f"w{i + 1}" for i in range(sc.workers)]
    ok_times: list[float] = []
    per_phase_ok = [0] * len(sc.phases)
    per_account_ok = {s: 0 for s in sessions}
    floods: list[dict[str, Any]] = []
    bins = int(seconds) + 1
    timeline = {s: [0] * bins for s in sessions}
    for row in _read_log(log_path):
        ts = row["ts"]
        if not t_start <= ts < t_end or row["method"] != "messages.GetHistory":
            continue
        if row["outcome"] == "ok":
            ok_times.append(ts)
            phase = max(i for i in range(len(sc.phases)) if bounds[i] <= ts)
            per_phase_ok[phase] += 1
            per_account_ok[row["session"]] += 1
            timeline[row["session"]][int(ts - t_start)] += 1
        elif row["outcome"] == "flood":
            floods.append(
                {"t": round(ts - t_start, 3), "session": row["session"], "n": row["flood_wait"]}
            )
    durations = [bounds[i + 1] - bounds[i] for i in range(len(sc.phases))]
    pairs = list(zip(sc.phases, durations, strict=True))
    allowed = sum(p.allows(d, n == 0) for n, (p, d) in enumerate(pairs))
    own_allowed = {s: sum(p.account_allows(i, d, n == 0) for n, (p, d) in enumerate(pairs))
                   for i, s in enumerate(sessions)}  # fmt: skip
    account_share = {s: round(per_account_ok[s] / own_allowed[s], 3) for s in sessions}
    # Settle: FloodWaits from a drop until the first quiet SETTLE_QUIET_S.
    settle: int | None = None
    for i in range(1, len(sc.phases)):
        if sc.phases[i].allowed() < sc.phases[i - 1].allowed():
            settle, last = 0, changes[i] - t_start
            for f in sorted(x["t"] for x in floods if x["t"] >= changes[i] - t_start):
                if f - last >= SETTLE_QUIET_S:
                    break
                settle += 1
                last = f
    span = max(2.0, sc.longest_window())
    ok_times.sort()
    t90 = [
        _time_to(ok_times, changes[i], bounds[i + 1], 0.9 * sc.phases[i].allowed(), span)
        for i in range(len(sc.phases))
    ]
    lost = sum(s["flood_sleep_s"] + s.get("held_s", 0.0) for s in stats)
    return {
        "scenario": sc.name,
        "policy": policy,
        "label": LABELS[policy],
        "seconds": seconds,
        "messages": sum(s["messages"] for s in stats),
        "history_ok": len(ok_times),
        "allowed_requests": round(allowed, 1),
        "share": round(len(ok_times) / allowed, 3),
        "share_per_phase": [
            round(n / p.allows(d, i == 0), 3)
            for i, (n, p, d) in enumerate(zip(per_phase_ok, sc.phases, durations, strict=True))
        ],
        "account_share_of_own_limit": account_share,
        "min_account_share": min(account_share.values()),
        "flood_waits": len(floods),
        "flood_waits_to_settle_after_drop": settle,
        "worker_seconds_lost": round(lost, 1),
        "worker_seconds_lost_own_sleeps": round(sum(s["flood_sleep_s"] for s in stats), 1),
        "worker_seconds_lost_pauses_and_holds": round(sum(s.get("held_s", 0.0) for s in stats), 1),
        "seconds_to_90pct_after_each_change": t90,
        "span_s": span,
        "errors": sum(s["errors"] for s in stats),
        "acquire_ms_p50": _max_or_none(s.get("acquire_ms_p50") for s in stats),
        "acquire_ms_p99": _max_or_none(s.get("acquire_ms_p99") for s in stats),
        "timeline_ok_per_s": timeline,
        "floods": floods,
        "change_at_s": [round(c - t_start, 3) for c in changes],
    }


def _max_or_none(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(max(present), 3) if present else None


def _time_to(ok: list[float], t0: float, t1: float, target: float, span: float) -> float | None:
    """Seconds after ``t0`` until the answered rate over ``span`` reaches ``target`` (the span
    starting at that moment, within [t0, t1]); None if it never does."""
    import bisect

    step = 0.25
    t = t0
    while t + span <= t1 + 1e-9:
        n = bisect.bisect_left(ok, t + span) - bisect.bisect_left(ok, t)
        if n / span >= target:
            return round(t - t0, 2)
        t += step
    return None


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<11}{'policy':<22}{'share':>7}{'phases':>14}{'acct':>7}{'floods':>7}"
        f"{'settle':>7}{'lost s':>8}  t90 s"
    )
    lines = [head, "-" * (len(head) + 8)]
    for r in results:
        phases = "/".join(f"{x:.0%}" for x in r["share_per_phase"])
        settle = (
            "-"
            if r["flood_waits_to_settle_after_drop"] is None
            else str(r["flood_waits_to_settle_after_drop"])
        )
        t90 = "/".join(
            "-" if t is None else f"{t:g}" for t in r["seconds_to_90pct_after_each_change"]
        )
        lines.append(
            f"{r['scenario']:<11}{r['label']:<22}{r['share']:>7.1%}{phases:>14}"
            f"{r['min_account_share']:>7.0%}{r['flood_waits']:>7}{settle:>7}"
            f"{r['worker_seconds_lost']:>8.1f}  {t90}"
        )  # fmt: skip
    return "\n".join(lines)


def targets(by_policy: dict[str, dict[str, Any]], sc: Scenario) -> dict[str, bool] | None:
    """The issue's acceptance targets for the governor in one scenario run."""
    g = by_policy.get("governor")
    if g is None:
        return None
    out: dict[str, bool] = {"share_ge_0.90": g["share"] >= 0.9}
    others = [r["share"] for p, r in by_policy.items() if p != "governor"]
    if others:
        out["share_ge_best_baseline"] = g["share"] >= max(others)
    if "telethon" in by_policy:
        out["floods_le_telethon_over_3"] = (
            g["flood_waits"] <= by_policy["telethon"]["flood_waits"] / 3
        )
    if sc.name == "hetero":
        out["every_account_ge_0.85"] = g["min_account_share"] >= 0.85
    t90 = g["seconds_to_90pct_after_each_change"]
    if sc.name in ("high", "low"):
        out["t90_from_start_le_20s"] = t90[0] is not None and t90[0] <= 20
    if sc.name == "rise":
        out["t90_after_rise_le_10s"] = t90[1] is not None and t90[1] <= 10
    if g["flood_waits_to_settle_after_drop"] is not None:
        out["settle_le_2"] = g["flood_waits_to_settle_after_drop"] <= 2
    return out  # fmt: skip


def plot(document: dict[str, Any], directory: Path) -> list[Path]:
    """One PNG per scenario: answered requests/s per policy against the hidden limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for run in document["runs"]:
        sc = run["scenario"]
        results = run["results"]
        fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.4 * len(results)), sharex=True,
                                 squeeze=False)  # fmt: skip
        for ax, r in zip(axes[:, 0], results.values(), strict=True):
            timeline = r["timeline_ok_per_s"]
            n = int(r["seconds"])  # whole seconds only: the last bin is a partial one
            xs = list(range(n))
            total = [sum(t[i] for t in timeline.values()) for i in xs]
            ax.plot(xs, total, color="black", lw=1.2, label="answered/s, fleet")
            if any(len({tuple(a) for a in p["accounts"]}) > 1 for p in sc["phases"]):
                for name, t in timeline.items():
                    ax.plot(xs, t[:n], lw=0.8, alpha=0.7, label=f"answered/s, {name}")
            limit_x, limit_y = [], []
            changes = [*r["change_at_s"], r["seconds"]]
            for i, phase in enumerate(sc["phases"]):
                allowed = Phase(
                    tuple(tuple(a) for a in phase["accounts"]), tuple(phase["fleet"])
                ).allowed()
                limit_x += [changes[i], changes[i + 1]]
                limit_y += [allowed, allowed]
            ax.plot(limit_x, limit_y, color="tab:green", ls="--", label="what the limits allow")
            top = max([*total, *limit_y, 1])
            for f in r["floods"]:
                ax.axvline(f["t"], color="tab:red", alpha=0.35, lw=0.8)
            ax.set_ylim(0, top * 1.15)
            ax.set_ylabel("req/s")
            ax.set_title(
                f"{r['label']}: {r['share']:.0%} of allowed, {r['flood_waits']} FloodWaits "
                "(red lines)", fontsize=9,
            )  # fmt: skip
            ax.legend(fontsize=7, loc="lower right")
        axes[-1, 0].set_xlabel("seconds")
        fig.suptitle(f"scenario {sc['name']} (seed {sc['seed']})")
        fig.tight_layout()
        path = directory / f"governor_{sc['name']}_seed{sc['seed']}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="drop", help=f"one of {', '.join(SCENARIOS)}, all")
    parser.add_argument("--seed", type=int, action="append", help="repeatable (default 1)")
    parser.add_argument("--seconds", type=float, default=120.0, help="per policy (default 120)")
    parser.add_argument("--out", type=Path, default=Path("bench-governor.json"))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write one PNG per scenario")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the policies one after the other (default: side by side, each on its own "
        "Redis servers, started and changed at the same moments)",
    )
    parser.add_argument("--replot", type=Path, metavar="FILE", help="plot an earlier --out")
    parser.add_argument(
        "--governor-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the governor process and the governor's workers "
        "(e.g. FLOOD_FLEET_HOLD_SECONDS=0.5)",
    )
    args = parser.parse_args()
    if args.replot is not None:
        if args.plot is None:
            parser.error("--replot needs --plot DIR")
        for path in plot(json.loads(args.replot.read_text()), args.plot):
            print(f"written {path}")
        return 0
    names = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            parser.error(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    try:
        scenarios = [make_scenario(n, seed) for seed in (args.seed or [1]) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    extra = dict(item.split("=", 1) for item in args.governor_env)
    workdir = Path(tempfile.mkdtemp(prefix="bench-governor-"))
    servers: dict[str, tuple[_Redis, _Redis]] = {}
    runs: list[dict[str, Any]] = []
    flat: list[dict[str, Any]] = []
    try:
        for policy in policies:
            servers[policy] = (
                _Redis(workdir / f"redis-governor-{policy}"),
                _Redis(workdir / f"redis-sim-{policy}"),
            )
        for sc in scenarios:
            by = run_policies(
                sc, policies, args.seconds, servers, workdir, extra, parallel=not args.sequential
            )
            flat.extend(by.values())
            runs.append({"scenario": asdict(sc), "results": by, "targets": targets(by, sc)})
            # Written after every scenario: a long matrix interrupted keeps what it measured.
            document = {
                "seconds_per_policy": args.seconds,
                "side_by_side": not args.sequential,
                "governor_env": extra,
                "runs": runs,
                "workdir": str(workdir),
            }
            args.out.write_text(json.dumps(document, indent=1))
    finally:
        for pair in servers.values():
            for server in pair:
                server.stop()
    print(table(flat))
    for run in runs:
        if run["targets"]:
            sc = run["scenario"]
            print(f"targets for the governor, {sc['name']} seed {sc['seed']}:",
                  json.dumps(run["targets"]))  # fmt: skip
    if args.plot is not None:
        for path in plot(document, args.plot):
            print(f"written {path}")
    print(f"written {args.out} (logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
