"""Chaos run (issue 11): the fleet under faults must end every command like a fault-free run.

For each seed: a fault-free run, then a chaos run of the same 15 commands (ranges, overlapping
dates, ``per_day`` and ``batch``) on 3 worker processes + 1 governor, each against a fresh
``redis-server`` (AOF, ``appendfsync always``) and a fresh DATA_DIR on a tmpfs. Faults of the
chaos run, timed from the first command pushed:

* a worker ``kill -9`` every 3-6 s (a random one), restarted 1 s later under the same
  ``WORKER_ID`` and pinned session (as supervisord does);
* Redis ``kill -9`` at 5 s, restarted at once from its AOF;
* the governor ``kill -9`` at 7 s, restarted 1 s later;
* one worker SIGSTOPped at 9 s for 2 x ``WORKER_LEASE_SECONDS``;
* DATA_DIR full (a filler file up to ENOSPC) from 11 s for 15 s.

Checked per seed: every command has exactly one ``completed`` event and no non-retryable
``failed``; day files identical to the fault-free run's (``fetched_at`` aside); no dead
letters; queue, delayed set and processing lists empty. Reported: kills, wall time of both
runs, deliveries (``started`` events) per command, and how long restarted workers took to
serve again (health file ``idle``/``busy``). Needs root for the tmpfs mount. Usage::

    python bench/chaos.py --seeds 1,2,3 --out bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis as syncredis  # noqa: E402

from fleet.keys import Keys  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

WORKERS = 3
LEASE_S = 2.0
KEYS = Keys("")


def commands(seed: int) -> list[dict[str, Any]]:
    """15 mixed commands on 3 chats, overlapping on purpose (same seed, same list)."""
    rng = random.Random(seed)
    out = []
    for n in range(15):
        chat = rng.choice(["@chaos_a", "@chaos_b", "@chaos_c"])
        first = rng.randint(1, 20)
        cmd: dict[str, Any] = {"command": "fetch", "chat": chat, "command_id": f"s{seed}-c{n:02d}"}
        if rng.random() < 0.3:
            cmd.update(mode="date", date=f"2025-03-{first:02d}")
        else:
            last = min(28, first + rng.randint(1, 7))
            cmd.update(
                mode="range", **{"from": f"2025-03-{first:02d}", "to": f"2025-03-{last:02d}"}
            )
        cmd["strategy"] = rng.choice(["batch", "per_day"])
        out.append(cmd)
    return out


def worker_env(
    redis_url: str, data_dir: Path, run_dir: Path, i: int, latency_ms: int, per_day: int
) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELEGRAM_", "REDIS_", "SIM_", "WORKER_", "METRICS_", "LOG_"))
    }
    env.update(
        REDIS_URL=redis_url,
        TELEGRAM_BACKEND="sim",
        TELEGRAM_SESSION=f"sim-{i}",
        WORKER_ID=f"chaos-w{i}",
        DATA_DIR=str(data_dir),
        SESSIONS_DIR=str(run_dir / "sessions"),
        HEALTH_FILE=str(run_dir / f"w{i}.health"),
        SIM_SESSIONS=",".join(f"sim-{k}" for k in range(1, WORKERS + 1)),
        SIM_HISTORY_REQUESTS="0",
        SIM_RESOLVE_REQUESTS="0",
        SIM_MESSAGES_PER_DAY=str(per_day),
        SIM_SEED="7",
        SIM_LATENCY_MS=str(latency_ms),
        RATE_LIMIT_STRATEGY="off",
        LOG_FORMAT="console",
        LOG_LEVEL="INFO",
        METRICS_MODE="off",
        WORKER_LEASE_SECONDS=str(LEASE_S),
        SESSION_LEASE_SECONDS="10",
        RECOVERY_INTERVAL_SECONDS="0.5",
        COMMAND_POP_TIMEOUT_SECONDS="0.5",
        SESSION_WAIT_SECONDS="0.5",
        SHUTDOWN_GRACE_SECONDS="5",
        PROGRESS_EVENT_INTERVAL_SECONDS="1",
        COMMAND_RETRY_BASE_SECONDS="1",
        COMMAND_RETRY_MAX_SECONDS="4",
        COMMAND_RETRY_MAX="12",
        REDIS_MAX_OUTAGE_SECONDS="60",
        PYTHONPATH=str(ROOT),
    )
    return env


def governor_env(redis_url: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "GOVERNOR_", "SCHEDULE_", "AIMD_", "METRICS_"))
    }
    env.update(
        REDIS_URL=redis_url,
        GOVERNOR_ID="gov-1",
        METRICS_MODE="off",
        LOG_FORMAT="console",
        WORKER_LEASE_SECONDS=str(LEASE_S),
        RECOVERY_INTERVAL_SECONDS="0.5",
        REDIS_MAX_OUTAGE_SECONDS="60",
        PYTHONPATH=str(ROOT),
    )
    return env


class Proc:
    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        if not self.alive():
            return None if self.proc is None else self.proc.returncode
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def health(run_dir: Path, i: int) -> str | None:
    try:
        return str(json.loads((run_dir / f"w{i}.health").read_text()).get("status"))
    except (OSError, ValueError):
        return None


def events(client: syncredis.Redis) -> list[dict[str, Any]]:
    try:
        return [json.loads(f[b"event"]) for _id, f in client.xrange(KEYS.events_stream)]
    except (syncredis.ConnectionError, syncredis.TimeoutError):
        return []


def day_files(data_dir: Path) -> dict[str, Any]:
    out = {}
    for path in sorted(data_dir.rglob("discussions_*.json")):
        doc = json.loads(path.read_text())
        doc.pop("fetched_at", None)
        out[str(path.relative_to(data_dir))] = doc
    return out


def fill(path: Path) -> int:
    written = 0
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
                written += 65536
        except OSError:
            pass
    return written


def run(
    seed: int, chaos: bool, base: Path, latency_ms: int, per_day: int, timeout_s: float
) -> dict[str, Any]:
    run_dir = base / f"seed{seed}-{'chaos' if chaos else 'clean'}"
    mnt = run_dir / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    data_dir = mnt / "data"
    rs = RedisServer(run_dir / "redis", appendonly=True).start()
    client = syncredis.Redis.from_url(rs.url)
    workers = {
        i: Proc(
            [sys.executable, "-m", "worker"],
            worker_env(rs.url, data_dir, run_dir, i, latency_ms, per_day),
            run_dir / f"w{i}.log",
        )
        for i in range(1, WORKERS + 1)
    }
    gov = Proc([sys.executable, "-m", "governor"], governor_env(rs.url), run_dir / "gov.log")
    rng = random.Random(seed * 1000 + 17)
    log: list[str] = []
    kills = 0
    restart_latencies: list[float] = []
    try:
        for w in workers.values():
            w.start()
        gov.start()
        deadline = time.monotonic() + 60
        while not all(health(run_dir, i) in ("idle", "busy") for i in workers):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not become ready")
            time.sleep(0.05)
        cmds = commands(seed)
        ids = [c["command_id"] for c in cmds]
        client.rpush(KEYS.commands, *(json.dumps(c) for c in cmds))
        t0 = time.monotonic()
        next_kill = rng.uniform(3, 6)
        pending_restarts: list[tuple[float, int]] = []  # (at, worker)
        waiting_ready: dict[int, float] = {}  # worker -> restart time
        scheduled = {"redis": 5.0, "governor": 7.0, "sigstop": 9.0, "full": 11.0}
        gov_restart_at: float | None = None
        stopped: tuple[int, float] | None = None
        filler: tuple[Path, float] | None = None
        done_at: float | None = None
        while True:
            now = time.monotonic() - t0
            evs = events(client)
            completed = {e["command_id"] for e in evs if e["event"] == "completed"}
            if set(ids) <= completed:
                done_at = now
                break
            if now > timeout_s:
                break
            if chaos:
                if now >= next_kill:
                    i = rng.randint(1, WORKERS)
                    # The SIGSTOPped worker is left alone: its pause is the fault under test.
                    if workers[i].alive() and (stopped is None or stopped[0] != i):
                        workers[i].kill9()
                        kills += 1
                        log.append(f"{now:6.1f}s kill -9 worker {i}")
                        pending_restarts.append((now + 1.0, i))
                    next_kill = now + rng.uniform(3, 6)
                for at, i in list(pending_restarts):
                    if now >= at:
                        pending_restarts.remove((at, i))
                        with open(run_dir / f"w{i}.health", "w"):
                            pass  # a stale file would read as ready at once
                        workers[i].start()
                        waiting_ready[i] = time.monotonic()
                        log.append(f"{now:6.1f}s restart worker {i}")
                for i, at in list(waiting_ready.items()):
                    if health(run_dir, i) in ("idle", "busy"):
                        restart_latencies.append(time.monotonic() - at)
                        del waiting_ready[i]
                    elif not workers[i].alive():
                        del waiting_ready[i]
                if "redis" in scheduled and now >= scheduled["redis"]:
                    del scheduled["redis"]
                    rs.kill()
                    rs.start()
                    log.append(f"{now:6.1f}s redis kill -9 + AOF restart")
                if "governor" in scheduled and now >= scheduled["governor"]:
                    del scheduled["governor"]
                    gov.kill9()
                    gov_restart_at = now + 1.0
                    log.append(f"{now:6.1f}s governor kill -9")
                if gov_restart_at is not None and now >= gov_restart_at:
                    gov.start()
                    gov_restart_at = None
                    log.append(f"{now:6.1f}s governor restarted")
                if "sigstop" in scheduled and now >= scheduled["sigstop"]:
                    del scheduled["sigstop"]
                    i = rng.choice([k for k, w in workers.items() if w.alive()] or [1])
                    workers[i].signal(signal.SIGSTOP)
                    stopped = (i, now + 2 * LEASE_S)
                    log.append(f"{now:6.1f}s SIGSTOP worker {i} for {2 * LEASE_S:g}s")
                if stopped is not None and now >= stopped[1]:
                    workers[stopped[0]].signal(signal.SIGCONT)
                    log.append(f"{now:6.1f}s SIGCONT worker {stopped[0]}")
                    stopped = None
                if "full" in scheduled and now >= scheduled["full"]:
                    del scheduled["full"]
                    path = mnt / "filler"
                    size = fill(path)
                    filler = (path, now + 15.0)
                    log.append(f"{now:6.1f}s DATA_DIR full ({size >> 20} MiB filler)")
                if filler is not None and now >= filler[1]:
                    filler[0].unlink()
                    filler = None
                    log.append(f"{now:6.1f}s DATA_DIR space back")
            time.sleep(0.05)
        if stopped is not None:
            workers[stopped[0]].signal(signal.SIGCONT)
        if filler is not None:
            filler[0].unlink()
        # Let late events land (a zombie waking up would publish now), then look.
        time.sleep(2 * LEASE_S)
        evs = events(client)
        terminal: dict[str, list[str]] = {c: [] for c in ids}
        started: dict[str, int] = {c: 0 for c in ids}
        for e in evs:
            if e["command_id"] not in terminal:
                continue
            if e["event"] == "started":
                started[e["command_id"]] += 1
            elif e["event"] == "completed":
                terminal[e["command_id"]].append("completed")
            elif e["event"] == "failed":
                terminal[e["command_id"]].append("failed" + ("(retry)" if e["retryable"] else ""))
        leftovers = {
            "queue": client.llen(KEYS.commands),
            "delayed": client.zcard(KEYS.delayed),
            "dead_letters": client.llen(KEYS.dead_letters),
            "processing": sum(client.llen(KEYS.processing(f"chaos-w{i}")) for i in workers),
        }
        files = day_files(data_dir)
        codes = {f"w{i}": w.stop() for i, w in workers.items()}
        codes["gov"] = gov.stop()
        return {
            "seed": seed,
            "chaos": chaos,
            "wall_s": round(done_at, 1) if done_at is not None else None,
            "timed_out": done_at is None,
            "kills": kills,
            "faults": log,
            "terminal": terminal,
            "deliveries": started,
            "leftovers": leftovers,
            "restart_to_serving_s": [round(x, 2) for x in restart_latencies],
            "exit_codes": codes,
            "_files": files,
        }
    finally:
        for w in workers.values():
            w.stop()
        gov.stop()
        client.close()
        rs.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--latency-ms", type=int, default=300, help="simulated Telegram latency")
    ap.add_argument("--messages-per-day", type=int, default=1000, help="simulated history")
    ap.add_argument("--timeout", type=float, default=240.0, help="per run, seconds")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workdir", type=Path, help="keep logs and data here (default: a temp dir)")
    args = ap.parse_args()
    results = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp_dir:
        tmp = str(args.workdir) if args.workdir else tmp_dir
        for seed in (int(s) for s in args.seeds.split(",")):
            sizes = (args.latency_ms, args.messages_per_day, args.timeout)
            clean = run(seed, False, Path(tmp), *sizes)
            wild = run(seed, True, Path(tmp), *sizes)
            same_files = clean["_files"] == wild["_files"] and bool(clean["_files"])
            checks = {
                "one_completed_each": all(
                    t.count("completed") == 1 for t in wild["terminal"].values()
                ),
                "no_final_failure": all("failed" not in t for t in wild["terminal"].values()),
                "files_identical": same_files,
                "drained": not any(wild["leftovers"].values()),
                "not_timed_out": not wild["timed_out"] and not clean["timed_out"],
            }
            ok = ok and all(checks.values())
            lat = wild["restart_to_serving_s"]
            summary = {
                "seed": seed,
                "checks": checks,
                "kills": wild["kills"],
                "wall_s": {"fault_free": clean["wall_s"], "chaos": wild["wall_s"]},
                "deliveries_per_command": wild["deliveries"],
                "restart_to_serving_median_s": statistics.median(lat) if lat else None,
                "restart_to_serving_s": lat,
                "retryable_failures": sum(
                    t.count("failed(retry)") for t in wild["terminal"].values()
                ),
                "day_files": len(wild["_files"]),
                "not_completed": {
                    c: t for c, t in wild["terminal"].items() if t.count("completed") != 1
                },
                "leftovers": wild["leftovers"],
                "faults": wild["faults"],
                "exit_codes": wild["exit_codes"],
            }
            results.append(summary)
            print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
