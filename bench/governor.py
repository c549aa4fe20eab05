"""Benchmark: three rate policies against the same simulator with a hidden limit.

    python bench/governor.py --seconds S --out FILE.json      (S = 120 by default)

For each policy, one after the other on fresh Redis state, 3 worker processes
(``bench/_bench_worker.py``) page through history over the simulator for S seconds:

(a) ``telethon``: no limiter; FloodWaits are slept through (Telethon's default behaviour);
(b) ``fixed``: a per-process limiter at a third of the initial fleet rate, no shared state;
(c) ``governor``: :class:`worker.fleet_gate.FleetGate` plus a ``python -m governor`` process.

The hidden limit is per account *and* fleet-wide (sliding windows in the simulator), starts
1.5× below the initial rate and drops by 40% halfway (written to the simulator's limits hash at
runtime). The simulator keeps its fleet window on a Redis server of its own, so the
governor's Redis sees only governor traffic. Per policy it reports: messages/s, share of the
hidden limit used (history requests answered / what the hidden limit allowed), FloodWaits,
worker-seconds lost sleeping on FloodWaits, acquire latency p50/p99 (the bucket script's round
trip as the worker sees it), Redis round trips per Telegram request (counted in the worker's
client; INFO commandstats deltas are reported alongside), and FloodWaits to settle after the
drop (FloodWaits from the drop until the first 5 s without any). Alongside, the same run
measures the environment's floor for any Redis round trip: a thread PINGs the governor's Redis
every 45 ms (``ping_ms_p50``/``ping_ms_p99``; its PINGs show in the commandstats delta).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fleet.keys import Keys  # noqa: E402

WORKERS = 3
WINDOW_S = 2.0
# Hidden limits (requests per WINDOW_S): per account 10/s, fleet 24/s; after the drop 40% less.
HIDDEN = {"account": 20, "fleet": 48}
DROPPED = {"account": 12, "fleet": 29}
# The initial rates are 1.5× the hidden ones.
INITIAL_SESSION_RATE = 1.5 * HIDDEN["account"] / WINDOW_S
INITIAL_FLEET_RATE = 1.5 * HIDDEN["fleet"] / WINDOW_S
SETTLE_QUIET_S = 5.0
POLICIES = ("telethon", "fixed", "governor")
LABELS = {
    "telethon": "(a) Telethon defaults",
    "fixed": "(b) fixed per-worker",
    "governor": "(c) governor",
}


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
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _gate_settings() -> dict[str, Any]:
    return {
        "rate_history_per_second": INITIAL_SESSION_RATE,
        "rate_history_burst": 2,
        "fleet_rate_history_per_second": INITIAL_FLEET_RATE,
        "fleet_rate_history_burst": 1,  # the default
    }


def _governor_env(gov: _Redis, prefix: str, extra: dict[str, str]) -> dict[str, str]:
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
    for key, value in _gate_settings().items():
        env[key.upper()] = str(value)
    env.update(extra)
    return env


class _PingProbe(threading.Thread):
    """The environment's floor for any Redis call, measured during the same run: a client
    that PINGs the governor's Redis every 45 ms (a worker's cadence between requests), so
    its round trips see the same idle-CPU wake-ups and the same load as the workers' acquires."""

    def __init__(self, url: str, interval_s: float = 0.045) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        self.client.ping()
        while not self.done.wait(self.interval_s):
            t0 = time.perf_counter()
            self.client.ping()
            self.samples_ms.append((time.perf_counter() - t0) * 1000)

    def stop(self) -> dict[str, float | None]:
        self.done.set()
        self.join(5)
        self.client.close()
        ordered = sorted(self.samples_ms)

        def pct(q: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

        return {"ping_ms_p50": pct(0.5), "ping_ms_p99": pct(0.99), "pings": len(ordered)}


def _commandstats(client: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def run_policy(
    policy: str, seconds: float, gov: _Redis, sim: _Redis, workdir: Path, env_extra: dict[str, str]
) -> dict[str, Any]:
    gov.client().flushall()
    sim.client().flushall()
    prefix = f"bench_{policy}:"
    sim_prefix = f"sim_{policy}:"
    limits_key = f"{sim_prefix}sim:{{sim}}:limits"
    sim.client().hset(
        limits_key,
        mapping={
            "history_requests": HIDDEN["account"],
            "history_window_seconds": WINDOW_S,
            "fleet_requests": HIDDEN["fleet"],
            "fleet_window_seconds": WINDOW_S,
        },
    )
    log_path = workdir / f"requests_{policy}.jsonl"
    log_path.unlink(missing_ok=True)
    governor: subprocess.Popen[bytes] | None = None
    gov_log = open(workdir / f"governor_{policy}.log", "wb")  # noqa: SIM115
    if policy == "governor":
        governor = subprocess.Popen(
            [sys.executable, "-m", "governor", "run"],
            cwd=workdir,
            env=_governor_env(gov, prefix, env_extra),
            stdout=gov_log,
            stderr=subprocess.STDOUT,
        )
        # As deployed, the governor is already leading (and sampling) when the fleet starts.
        leader_key = Keys(prefix).governor_leader
        deadline = time.monotonic() + 30
        while not gov.client().exists(leader_key):
            if time.monotonic() > deadline or governor.poll() is not None:
                raise RuntimeError("the governor did not take the leader lease")
            time.sleep(0.05)
        time.sleep(2.0)
    ready_key = f"{prefix}bench:ready"
    before = _commandstats(gov.client())
    workers = []
    for i in range(WORKERS):
        cfg = {
            "session": f"w{i + 1}",
            "policy": policy,
            "seconds": seconds,
            "redis_url": gov.url,
            "prefix": prefix,
            "sim_redis_url": sim.url,
            "sim_prefix": sim_prefix,
            "request_log": str(log_path),
            "fixed_rate": INITIAL_FLEET_RATE / WORKERS,
            "settings": _gate_settings(),
            "ready_key": ready_key,
            "keep_latencies": True,
            "latency_ms": 10.0,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "_bench_worker.py"), json.dumps(cfg)],
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        )
    client = gov.client()
    for _ in workers:
        if client.blpop([ready_key], timeout=60) is None:
            raise RuntimeError(f"{policy}: a worker did not start")
    t_start = time.time()
    probe = _PingProbe(gov.url)
    probe.start()
    time.sleep(max(0.0, t_start + seconds / 2 - time.time()))
    sim.client().hset(
        limits_key,
        mapping={"history_requests": DROPPED["account"], "fleet_requests": DROPPED["fleet"]},
    )
    t_drop = time.time()
    stats = []
    for p in workers:
        out, _ = p.communicate(timeout=seconds + 60)
        stats.append(json.loads(out.decode().strip().splitlines()[-1]))
    ping = probe.stop()
    after = _commandstats(gov.client())
    if governor is not None:
        governor.send_signal(signal.SIGTERM)
        governor.wait(30)
    gov_log.close()
    return summarize(policy, seconds, stats, log_path, t_start, t_drop, before, after) | ping


def summarize(
    policy: str,
    seconds: float,
    stats: list[dict[str, Any]],
    log_path: Path,
    t_start: float,
    t_drop: float,
    before: dict[str, int],
    after: dict[str, int],
) -> dict[str, Any]:
    t_end = t_start + seconds
    ok = {"before": 0, "after": 0}
    floods: list[float] = []
    requests = 0
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            ts = row["ts"]
            if not t_start <= ts <= t_end or row["method"] != "messages.GetHistory":
                continue
            requests += 1
            if row["outcome"] == "ok":
                ok["before" if ts < t_drop else "after"] += 1
            elif row["outcome"] == "flood":
                floods.append(ts)
    cap_before = min(HIDDEN["fleet"], WORKERS * HIDDEN["account"]) / WINDOW_S
    cap_after = min(DROPPED["fleet"], WORKERS * DROPPED["account"]) / WINDOW_S
    allowed = cap_before * (t_drop - t_start) + cap_after * (t_end - t_drop)
    settle = 0
    last = t_drop
    for ts in sorted(f for f in floods if f >= t_drop):
        if ts - last >= SETTLE_QUIET_S:
            break
        settle += 1
        last = ts
    latencies = [x for s in stats for x in (s.get("acquire_ms") or [])]
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))], 3)

    sent = sum(s["requests"] for s in stats)
    round_trips = sum(s["round_trips"] for s in stats)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    top_level = sum(v for k, v in delta.items() if k in ("evalsha", "eval", "hgetall", "xread"))
    return {
        "policy": policy,
        "label": LABELS[policy],
        "seconds": seconds,
        "messages": sum(s["messages"] for s in stats),
        "messages_per_s": round(sum(s["messages"] for s in stats) / seconds, 1),
        "history_ok": ok["before"] + ok["after"],
        "history_ok_per_s": {
            "before_drop": round(ok["before"] / (t_drop - t_start), 2),
            "after_drop": round(ok["after"] / (t_end - t_drop), 2),
        },
        "hidden_limit_per_s": {"before_drop": cap_before, "after_drop": cap_after},
        "share_of_hidden_limit": round((ok["before"] + ok["after"]) / allowed, 3),
        "share_before_drop": round(ok["before"] / (cap_before * (t_drop - t_start)), 3),
        "share_after_drop": round(ok["after"] / (cap_after * (t_end - t_drop)), 3),
        "flood_waits": len(floods),
        "flood_waits_to_settle_after_drop": settle,
        "seconds_lost_waiting": round(sum(s["flood_sleep_s"] for s in stats), 1),
        "acquire_ms_p50": pct(0.5),
        "acquire_ms_p99": pct(0.99),
        "telegram_requests": sent,
        "redis_round_trips_per_request": round(round_trips / sent, 3) if round_trips else None,
        "redis_commandstats_delta": {k: v for k, v in sorted(delta.items()) if v},
        "redis_top_level_calls_per_request": round(top_level / sent, 3) if top_level else None,
        "errors": sum(s["errors"] for s in stats),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'policy':<24}{'msgs/s':>8}{'share':>8}{'floods':>8}{'settle':>8}{'lost s':>8}"
        f"{'acq p50':>9}{'acq p99':>9}{'RT/req':>8}{'PING p50':>10}{'PING p99':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:

        def f(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        lines.append(
            f"{r['label']:<24}{r['messages_per_s']:>8.0f}{r['share_of_hidden_limit']:>8.1%}"
            f"{r['flood_waits']:>8}{r['flood_waits_to_settle_after_drop']:>8}"
            f"{r['seconds_lost_waiting']:>8.1f}{f(r['acquire_ms_p50'], '.2f'):>9}"
            f"{f(r['acquire_ms_p99'], '.2f'):>9}{f(r['redis_round_trips_per_request'], '.3f'):>8}"
            f"{f(r.get('ping_ms_p50'), '.2f'):>10}{f(r.get('ping_ms_p99'), '.2f'):>10}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="per policy (default 120)")
    parser.add_argument("--out", type=Path, default=Path("bench-governor.json"))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--governor-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the governor process (e.g. GOVERNOR_TICK_SECONDS=0.5)",
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.governor_env)
    workdir = Path(tempfile.mkdtemp(prefix="bench-governor-"))
    gov = _Redis(workdir / "redis-governor")
    sim = _Redis(workdir / "redis-sim")
    results = []
    try:
        for policy in args.policies.split(","):
            print(f"running {LABELS[policy]} for {args.seconds:g} s ...", file=sys.stderr)
            results.append(run_policy(policy, args.seconds, gov, sim, workdir, extra))
    finally:
        gov.stop()
        sim.stop()
    by = {r["policy"]: r for r in results}
    document: dict[str, Any] = {
        "seconds_per_policy": args.seconds,
        "workers": WORKERS,
        "hidden_limit": {
            "window_seconds": WINDOW_S,
            "per_account_requests": HIDDEN["account"],
            "fleet_requests": HIDDEN["fleet"],
            "after_drop": DROPPED,
        },
        "initial_rates": {"session": INITIAL_SESSION_RATE, "fleet": INITIAL_FLEET_RATE},
        "governor_env": extra,
        "results": by,
        "workdir": str(workdir),
    }
    if "governor" in by and "telethon" in by:
        g, a = by["governor"], by["telethon"]
        document["targets"] = {
            "share_ge_0.90": g["share_of_hidden_limit"] >= 0.9,
            "floods_le_a_over_5": g["flood_waits"] <= a["flood_waits"] / 5,
            "settle_le_2": g["flood_waits_to_settle_after_drop"] <= 2,
            "acquire_p99_le_1ms": (g["acquire_ms_p99"] or 99) <= 1.0,
            "round_trips_le_1.1": (g["redis_round_trips_per_request"] or 99) <= 1.1,
        }
    args.out.write_text(json.dumps(document, indent=2))
    print(table(results))
    if "targets" in document:
        print("targets for (c):", json.dumps(document["targets"]))
    print(f"written {args.out} (logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
