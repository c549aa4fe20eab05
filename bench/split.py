"""Benchmark: one large fetch, 1 vs 3 vs 6 workers, split into per-day parts or not (issue 14).

    python bench/split.py [--days 30] [--per-day 500] [--out FILE.json]

One chat with ``--days`` days of simulator history (``SIM_MESSAGES_PER_DAY=--per-day``), one
``per_day`` range command over those days, pushed once the workers are ready. The simulator
enforces a hidden per-account limit (``HIDDEN_REQUESTS`` history requests per ``WINDOW_S``);
every worker paces its own session below it (``RATE_LIMIT_STRATEGY=fixed``,
``RATE_HISTORY_PER_SECOND``), and the fleet bucket is set high enough not to be the bottleneck.
Every part resolves the chat once per session (cached after): behind a fleet resolve bucket of
1/s with a burst below N, the N-th fresh session starts about N-1 s late, so the benchmark sets
``FLEET_RATE_RESOLVE_PER_SECOND`` to 6 by default and the burst to 6 (the default burst is 20).
For 1, 3 and 6 workers, with ``FETCH_SPLIT_PER_DAY`` off and on, in the same run on a fresh
redis-server each: wall time from the push to the terminal event, speed-up over one worker,
and from the simulator's request log per session: history requests, mean rate while active,
the most requests in any sliding window of ``WINDOW_S`` (must stay <= the hidden limit), and
FloodWaits; and the CPU seconds the workers used during the fetch (with few cores, parsing and
writing the messages, not the rate limit, bounds how much more workers can help).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.governor import _Redis  # noqa: E402
from fleet.keys import Keys  # noqa: E402

WINDOW_S = 2.0
HIDDEN_REQUESTS = 20  # per account per WINDOW_S: 10 requests/s
SESSION_RATE = 8.0  # what each worker paces its session at (80% of the hidden limit)
SESSIONS = [f"bench-{i}" for i in range(1, 7)]


def worker_env(
    url: str, data: Path, tmp: Path, log: Path, split: bool, per_day: int, resolve_rate: float
) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "LOG_", "RATE"))
    }
    env.update(
        {
            "REDIS_URL": url,
            "TELEGRAM_BACKEND": "sim",
            "DATA_DIR": str(data),
            "SESSIONS_DIR": str(tmp / "sessions"),
            "SIM_SESSIONS": ",".join(SESSIONS),
            "SIM_MESSAGES_PER_DAY": str(per_day),
            "SIM_EMPTY_DAY_RATIO": "0",
            "SIM_SEED": "11",
            "SIM_HISTORY_REQUESTS": str(HIDDEN_REQUESTS),
            "SIM_HISTORY_WINDOW_SECONDS": str(WINDOW_S),
            "SIM_RESOLVE_REQUESTS": "0",
            "SIM_REQUEST_LOG": str(log),
            "RATE_LIMIT_STRATEGY": "fixed",
            "RATE_HISTORY_PER_SECOND": str(SESSION_RATE),
            "RATE_HISTORY_BURST": "1",
            "FLEET_RATE_HISTORY_PER_SECOND": "100",
            "FLEET_RATE_HISTORY_BURST": "6",
            "FLEET_RATE_RESOLVE_PER_SECOND": str(resolve_rate),
            "FLEET_RATE_RESOLVE_BURST": "6",
            "FETCH_SPLIT_PER_DAY": "true" if split else "false",
            "PARALLELISM_MAX": "1",
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "INFO",
            "METRICS_MODE": "off",
            "WORKER_LEASE_SECONDS": "5",
            "COMMAND_POP_TIMEOUT_SECONDS": "0.2",
            "SHUTDOWN_GRACE_SECONDS": "10",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def session_stats(log: Path) -> tuple[dict[str, dict[str, Any]], int]:
    times: dict[str, list[float]] = defaultdict(list)
    floods = 0
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["outcome"] == "flood":
            floods += 1
        if rec["method"].startswith("messages.GetHistory") or "GetHistory" in rec["method"]:
            times[rec["session"]].append(rec["ts"])
    out = {}
    for session, ts in sorted(times.items()):
        ts.sort()
        peak = max(bisect_left(ts, t + WINDOW_S) - i for i, t in enumerate(ts))
        span = max(ts[-1] - ts[0], 1e-9)
        out[session] = {
            "history_requests": len(ts),
            "rate_per_s": round((len(ts) - 1) / span, 2) if len(ts) > 1 else None,
            "max_in_window": peak,
        }
    return out, floods


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    workers: int, split: bool, days: int, per_day: int, tmp: Path, resolve_rate: float
) -> dict[str, Any]:
    work = tmp / f"w{workers}-{'split' if split else 'whole'}"
    work.mkdir()
    server = _Redis(work / "redis")
    client = server.client()
    log = work / "requests.jsonl"
    env = worker_env(server.url, work / "data", work, log, split, per_day, resolve_rate)
    procs = []
    try:
        for i in range(workers):
            health = work / f"w{i}.health"
            out = open(work / f"w{i}.log", "wb")  # noqa: SIM115
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "worker"],
                        env={**env, "HEALTH_FILE": str(health)},
                        cwd=work,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    ),
                    out,
                    health,
                )
            )
        deadline = time.monotonic() + 60
        for _, _, health in procs:
            while not (health.exists() and '"idle"' in health.read_text()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready: see {work}")
                time.sleep(0.05)
        today = datetime.now(UTC).date()
        cmd = {
            "command": "fetch",
            "chat": "@bench_split_chat",
            "mode": "range",
            "from": (today - timedelta(days=days)).isoformat(),
            "to": (today - timedelta(days=1)).isoformat(),
            "strategy": "per_day",
            "command_id": "bench-1",
        }
        keys = Keys()
        cpu0 = sum(_cpu_s(p.pid) for p, _, _ in procs)
        started = time.monotonic()
        client.rpush(keys.commands, json.dumps(cmd))
        final = None
        while final is None:
            if time.monotonic() - started > 900:
                raise RuntimeError(f"no terminal event after 900 s: see {work}")
            for _, fields in client.xrange(keys.events_stream):
                ev = json.loads(fields[b"event"])
                if ev["command_id"] == "bench-1" and ev["event"] in ("completed", "failed"):
                    final = ev
            time.sleep(0.05)
        wall = time.monotonic() - started
        cpu = sum(_cpu_s(p.pid) for p, _, _ in procs) - cpu0
    finally:
        for proc, _, _ in procs:
            proc.terminate()
        for proc, out, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()
        client.close()
        server.stop()
    sessions, floods = session_stats(log)
    return {
        "workers": workers,
        "split": split,
        "event": final["event"],
        "processed": final["processed"],
        "wall_s": round(wall, 2),
        "worker_cpu_s": round(cpu, 2),  # CPU the workers used between push and terminal event
        "floods": floods,
        "sessions": sessions,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--per-day", type=int, default=500)
    ap.add_argument("--workers", default="1,3,6")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--split", default="off,on", help="off,on | on | off")
    ap.add_argument(
        "--fleet-resolve-rate",
        type=float,
        default=6.0,
        help="FLEET_RATE_RESOLVE_PER_SECOND (default 6; at the fleet default of 1/s, sessions "
        "past the burst of 6 wait about 1 s each: each session resolves the chat once)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-split-"))
    results = []
    try:
        for split in [v == "on" for v in args.split.split(",")]:
            for n in (int(x) for x in args.workers.split(",")):
                r = run(n, split, args.days, args.per_day, tmp, args.fleet_resolve_rate)
                results.append(r)
                peak = max(s["max_in_window"] for s in r["sessions"].values())
                print(
                    f"split={'on ' if split else 'off'} workers={n}: {r['wall_s']:7.2f} s, "
                    f"{r['processed']} messages, {len(r['sessions'])} sessions used, "
                    f"peak {peak}/{HIDDEN_REQUESTS} per {WINDOW_S:g} s, FloodWaits {r['floods']}, "
                    f"worker CPU {r['worker_cpu_s']:.1f} s on {os.cpu_count()} cores",
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        base = next((b for b in results if b["split"] == r["split"] and b["workers"] == 1), None)
        r["speedup_vs_1"] = round(base["wall_s"] / r["wall_s"], 2) if base else None
    summary = {
        "days": args.days,
        "per_day": args.per_day,
        "hidden_limit": f"{HIDDEN_REQUESTS} history requests / {WINDOW_S:g} s per account",
        "session_rate_per_s": SESSION_RATE,
        "fleet_resolve_rate_per_s": args.fleet_resolve_rate,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    for r in results:
        print(f"split={r['split']!s:5} workers={r['workers']}: speed-up {r['speedup_vs_1']}x")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
