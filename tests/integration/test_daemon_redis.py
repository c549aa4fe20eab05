"""Redis outages (issue 3, point 8): a restart mid-run (AOF) is ridden out; an outage longer
than REDIS_MAX_OUTAGE_SECONDS stops the worker gracefully (exit 69); AUTH works and the
password never reaches a log line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow


def test_workers_ride_out_a_redis_restart_and_finish_everything(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    fleet = Fleet(
        base_env(private_redis.url, tmp_path / "data", tmp_path, SIM_LATENCY_MS=40), tmp_path
    )
    rv = RedisView(private_redis.url)
    try:
        workers = fleet.start(3)
        cmds = [
            fetch(f"@restart_{i:02d}", "2025-05-01", "2025-05-03", command_id=f"r{i:02d}")
            for i in range(30)
        ]
        rv.push(*cmds)
        wait_for(lambda: len(rv.completed_ids()) >= 5, 30, "a few completed")
        private_redis.kill()
        down_at = time.monotonic()
        wait_for(
            lambda: all("unreachable" in w.log() for w in workers), 15, "workers saw the outage"
        )
        time.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))  # the outage lasts 2 s
        private_redis.start()
        rv = RedisView(private_redis.url)
        wanted = {c["command_id"] for c in cmds}
        wait_for(lambda: wanted <= rv.completed_ids(), 90, "every command completed")
        assert not rv.queue()
        assert all(w.proc.poll() is None for w in workers), "a worker exited"
        for w in workers:
            log = w.log()
            assert log.count("unreachable (") == 1, log  # one line per state change
            assert log.count("reachable again") == 1, log
        completed = rv.by_kind("completed")
        print(
            f"restart: {len(completed)} completed events for {len(wanted)} commands, "
            f"{len(completed) - len(wanted)} re-executions"
        )
    finally:
        codes = fleet.stop_all()
        rv.close()
    assert codes == [0, 0, 0]


def test_worker_stops_with_69_after_the_max_outage(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    fleet = Fleet(
        base_env(private_redis.url, tmp_path / "data", tmp_path, REDIS_MAX_OUTAGE_SECONDS=3),
        tmp_path,
    )
    try:
        [w] = fleet.start(1)
        killed = time.monotonic()  # before: killing a container returns after the drop is seen
        private_redis.kill()
        assert w.wait(20) == 69
        assert 3 <= time.monotonic() - killed < 12
        assert "redis unavailable" in w.log()
    finally:
        fleet.stop_all()


def test_redis_auth_works_and_the_password_is_never_logged(tmp_path: Path) -> None:
    secret = "s3cret-Pa55word-xyz"
    server = RedisServer(tmp_path / "redis-auth", password=secret).start()
    try:
        env = base_env(
            f"redis://default:{secret}@127.0.0.1:{server.port}/0",
            tmp_path / "data",
            tmp_path,
            LOG_LEVEL="DEBUG",
        )
        fleet = Fleet(env, tmp_path)
        rv = RedisView(server.url)
        try:
            fleet.start(1)
            rv.push(fetch("@ru_python", "2025-03-01", command_id="auth"))
            wait_for(lambda: "auth" in rv.completed_ids(), 15)
        finally:
            fleet.stop_all()
            rv.close()
        log = fleet.workers[0].log()
        assert "127.0.0.1" in log and secret not in log
        health = fleet.workers[0].health  # removed at exit; if left, it holds no secret
        assert not health.exists() or secret not in health.read_text()
    finally:
        server.stop()


def test_tls_and_acl_user(tmp_path: Path) -> None:
    """``rediss://user:password@…``: TLS and an ACL user, passed through to redis-py."""
    import shutil
    import subprocess

    from tests.redis_server import free_port

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    secret = "tls-Secret-42"
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(tmp_path),
            "--user",
            "default",
            "off",
            "--user",
            "fetcher",
            "on",
            f">{secret}",
            "~*",
            "&*",
            "+@all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://fetcher:{secret}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        import redis as syncredis

        client = syncredis.Redis.from_url(url)
        wait_for(lambda: _pings(client), 10, "TLS redis up")
        env = base_env(url, tmp_path / "data", tmp_path, LOG_LEVEL="DEBUG")
        fleet = Fleet(env, tmp_path)
        try:
            fleet.start(1)
            client.rpush(
                "tg_commands",
                '{"command":"fetch","chat":"@ru_python","mode":"date",'
                '"date":"2025-03-01","command_id":"tls"}',
            )
            wait_for(lambda: client.zscore("{tgf}:completed", "tls") is not None, 20)
        finally:
            fleet.stop_all()
            client.close()
        log = fleet.workers[0].log()
        assert "rediss://127.0.0.1" in log and secret not in log
    finally:
        server.terminate()
        server.wait(10)


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:
        return False


def test_a_worker_started_without_redis_stops_within_the_grace_period_on_sigterm(
    tmp_path: Path,
) -> None:
    """Seen in Compose: started while Redis was unreachable, a worker ignored SIGTERM until
    REDIS_MAX_OUTAGE_SECONDS (300 s) had passed, so `docker stop` ended in SIGKILL."""
    from tests.redis_server import free_port

    grace = 3.0
    env = base_env(
        f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        tmp_path / "data",
        tmp_path,
        REDIS_MAX_OUTAGE_SECONDS=300,
        SHUTDOWN_GRACE_SECONDS=grace,
    )
    fleet = Fleet(env, tmp_path)
    try:
        [w] = fleet.start(1, wait_ready=False)
        wait_for(lambda: "unreachable" in w.log(), 20, "the worker saw Redis down")
        w.signal()
        signalled = time.monotonic()
        code = w.wait(grace + 10)
        assert time.monotonic() - signalled <= grace + 1.0, w.log()
        assert code == 0, w.log()
    finally:
        fleet.stop_all()
