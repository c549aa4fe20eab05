"""Structured logs: JSON lines, bound context, secret scrubbing, non-blocking shipping."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import pytest
from loguru import logger

from fleet.logs import LogShipper, reset_logging, setup_logging
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("clean_env")

API_HASH = "0123456789abcdef0123456789abcdef"
PHONE = "+79991234567"
REDIS_PASSWORD = "s3cr3t-redis-pw"
SECRETS = (API_HASH, PHONE, PHONE.lstrip("+"), REDIS_PASSWORD)
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "telegram_api_hash": API_HASH,
        "telegram_phone": PHONE,
        "redis_password": REDIS_PASSWORD,
        "environment": "test",
        "log_level": "DEBUG",
    }
    values.update(overrides)
    return WorkerSettings(_env_file=None, **values)


class Logs:
    """Sets logging up against an in-memory stderr; ``lines()`` parses what was written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stderr: io.StringIO = io.StringIO()
        self._monkeypatch = monkeypatch

    def setup(self, stream: TextIO | None = None, **overrides: Any) -> LogShipper | None:
        # Patched here, in the test's call phase: pytest's capture swaps sys.stderr back at
        # the start of each phase, so a fixture-time patch would not last.
        self._monkeypatch.setattr(sys, "stderr", stream or self.stderr)
        return setup_logging(_settings(**overrides), worker_id="worker-01", component="worker")

    def text(self) -> str:
        return self.stderr.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Logs]:
    capture = Logs(monkeypatch)
    try:
        yield capture
    finally:
        reset_logging()
        logger.add(sys.__stderr__ or sys.stderr)  # loguru's own default, for other tests


# --------------------------------------------------------------------------------------------
# format and context


def test_every_line_is_json_with_the_contract_fields(logs: Logs) -> None:
    logs.setup()
    log = logger.bind(event="command_received", chat="@ru_python", command_id="c-1", mode="date")
    log.debug("command received")
    log.info(
        "fetched", event="day_saved", message_count=271, processed=271, total=300, duration_ms=3150
    )
    log.warning(
        "FloodWait encountered. Waiting {wait_seconds} seconds...",
        wait_seconds=65,
        error_type="FloodWaitError",
    )
    lines = logs.lines()
    assert len(lines) == 3
    for line in lines:
        assert TS.match(line["ts"]), line["ts"]
        assert line["service"] == "telegram-fetcher"
        assert line["environment"] == "test"
        assert line["worker_id"] == "worker-01"
        assert line["component"] == "worker"
        assert line["chat"] == "@ru_python" and line["command_id"] == "c-1"
        assert line["mode"] == "date"
    assert [x["level"] for x in lines] == ["DEBUG", "INFO", "WARNING"]
    assert lines[1]["event"] == "day_saved"
    assert (lines[1]["message_count"], lines[1]["processed"], lines[1]["total"]) == (271, 271, 300)
    assert lines[1]["duration_ms"] == 3150
    assert lines[2]["message"] == "FloodWait encountered. Waiting 65 seconds..."
    assert (lines[2]["wait_seconds"], lines[2]["error_type"]) == (65, "FloodWaitError")


def test_exceptions_are_a_field_with_type_and_traceback(logs: Logs) -> None:
    logs.setup()
    try:
        raise ConnectionError("peer reset")
    except ConnectionError:
        logger.exception("fetch failed")
    (line,) = logs.lines()
    assert line["level"] == "ERROR" and line["error_type"] == "ConnectionError"
    assert line["exception"]["type"] == "ConnectionError"
    assert line["exception"]["message"] == "peer reset"
    assert "Traceback" in line["exception"]["traceback"]


def test_level_filter_applies(logs: Logs) -> None:
    logs.setup(log_level="INFO")
    logger.debug("hidden")
    logger.info("shown")
    assert [x["message"] for x in logs.lines()] == ["shown"]


def test_command_id_is_on_every_line_of_a_command(logs: Logs) -> None:
    logs.setup()

    async def fetch_day(day: str) -> None:
        logger.debug("page read", day=day)
        await asyncio.sleep(0)
        logging.getLogger("telethon.client.messages").warning("telethon grumbles")
        logger.info("day saved", day=day)

    async def run_command() -> None:
        with logger.contextualize(command_id="c-42", chat="@ru_python"):
            logger.info("command started", event="started")
            await asyncio.gather(fetch_day("2025-11-06"), fetch_day("2025-11-07"))
            logger.info("command completed", event="completed")
        logger.info("idle")

    asyncio.run(run_command())
    lines = logs.lines()
    in_command = lines[:-1]
    assert len(in_command) == 8
    assert all(x["command_id"] == "c-42" for x in in_command)
    assert "command_id" not in lines[-1]
    assert {x["logger"] for x in in_command if x["message"] == "telethon grumbles"} == {
        "telethon.client.messages"
    }


def test_stdlib_logging_is_routed_at_warning_and_above(logs: Logs) -> None:
    logs.setup()
    logging.getLogger("telethon.network").info("chatty")
    logging.getLogger("redis.connection").warning("reconnecting to %s", "redis")
    (line,) = logs.lines()
    assert line["message"] == "reconnecting to redis"
    assert line["logger"] == "redis.connection" and line["level"] == "WARNING"


def test_console_format_is_one_readable_line(logs: Logs) -> None:
    logs.setup(log_format="console")
    logger.bind(command_id="c-1").info("Saved {n} messages", n=370, chat="@ru_python")
    text = logs.text()
    assert text.count("\n") == 1 and not text.startswith("{")
    assert "INFO" in text and "Saved 370 messages" in text
    assert "command_id=c-1" in text and "chat=@ru_python" in text and "worker-01" in text


# --------------------------------------------------------------------------------------------
# secrets


def _log_secrets_everywhere() -> None:
    logger.info(f"connecting with hash {API_HASH} for {PHONE}")
    logger.bind(dsn=f"redis://:{REDIS_PASSWORD}@redis:6379/0").warning("redis down")
    logger.info("nested", payload={"phone": PHONE, "list": [API_HASH, {"pw": REDIS_PASSWORD}]})
    logger.info("as object", obj=RuntimeError(f"auth {REDIS_PASSWORD}"))
    logging.getLogger("telethon.client.auth").warning("Phone %s", PHONE.lstrip("+"))
    try:
        raise PermissionError(f"bad hash {API_HASH}")
    except PermissionError:
        logger.exception("login failed")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_secrets_never_appear_on_stderr(logs: Logs, log_format: str) -> None:
    logs.setup(log_format=log_format)
    _log_secrets_everywhere()
    text = logs.text()
    assert text.count("***") >= 7
    for secret in SECRETS:
        assert secret not in text


# --------------------------------------------------------------------------------------------
# shipping


class Collector(BaseHTTPRequestHandler):
    """A stand-in log server: records (path, query, body); may fail the first requests."""

    received: list[tuple[str, dict[str, list[str]], bytes]]
    fail_first: int
    fail_status = 500
    auth: list[str | None]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        cls.auth.append(self.headers.get("Authorization"))
        if cls.fail_first > 0:
            cls.fail_first -= 1
            self.send_response(cls.fail_status)
        else:
            parts = urlsplit(self.path)
            cls.received.append((parts.path, parse_qs(parts.query), body))
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[Callable[..., tuple[str, type[Collector]]]]:
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(fail_first: int = 0, fail_status: int = 500) -> tuple[str, type[Collector]]:
        handler = type(
            "C",
            (Collector,),
            {"received": [], "auth": [], "fail_first": fail_first, "fail_status": fail_status},
        )
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join()
        server.server_close()


def _shipped(handler: type[Collector]) -> dict[str, list[dict[str, Any]]]:
    """sink -> records, decoded from the Loki and VictoriaLogs request bodies."""
    out: dict[str, list[dict[str, Any]]] = {"loki": [], "victorialogs": []}
    for path, _, body in handler.received:
        if path == "/loki/api/v1/push":
            for stream in json.loads(body)["streams"]:
                out["loki"].extend(json.loads(line) for _, line in stream["values"])
        else:
            out["victorialogs"].extend(json.loads(x) for x in body.decode().splitlines())
    return out


def test_batches_reach_loki_and_victorialogs_without_the_http_clients_own_records(
    logs: Logs, collector: Callable[..., tuple[str, type[Collector]]]
) -> None:
    url, handler = collector(0)
    shipper = logs.setup(
        loki_url=url, victoria_logs_url=f"{url}/insert/jsonline", log_batch_max_records=10
    )
    assert shipper is not None and sorted(shipper.sinks) == ["loki", "victorialogs"]
    for i in range(35):
        logger.bind(command_id="c-9").info("line {i}", i=i, event="progress")
    logging.getLogger("urllib3.connectionpool").warning("Retrying connection to loki")
    logging.getLogger("requests.adapters").error("requests failed")
    logging.getLogger("telethon.network").warning("telethon is shipped")
    assert shipper.close(timeout=5)

    shipped = _shipped(handler)
    for sink in ("loki", "victorialogs"):
        messages = [x["message"] for x in shipped[sink]]
        assert messages[:35] == [f"line {i}" for i in range(35)], sink
        assert messages[35:] == ["telethon is shipped"], sink
        assert all(x["worker_id"] == "worker-01" for x in shipped[sink])
    # ... while stderr still has every record, the HTTP clients' included.
    assert "Retrying connection to loki" in logs.text() and "requests failed" in logs.text()

    paths = [p for p, _, _ in handler.received]
    assert paths.count("/loki/api/v1/push") >= 4, "batched by LOG_BATCH_MAX_RECORDS"
    assert paths.count("/insert/jsonline") >= 4
    query = next(q for p, q, _ in handler.received if p == "/insert/jsonline")
    assert query["_stream_fields"] == ["service,environment,component"]
    assert query["_time_field"] == ["ts"] and query["_msg_field"] == ["message"]
    loki_body = next(json.loads(b) for p, _, b in handler.received if p.startswith("/loki"))
    stream = loki_body["streams"][0]
    assert stream["stream"] == {
        "service": "telegram-fetcher",
        "environment": "test",
        "component": "worker",
        "level": "info",
    }
    ts_ns, _line = stream["values"][0]
    assert abs(int(ts_ns) / 1e9 - time.time()) < 60


def test_the_shippers_own_status_lines_are_never_shipped(
    logs: Logs, collector: Callable[..., tuple[str, type[Collector]]]
) -> None:
    url, handler = collector(1)  # the first POST fails with 500, later ones succeed
    shipper = logs.setup(loki_url=url, log_batch_max_seconds=0.05)
    assert shipper is not None
    logger.info("first")
    deadline = time.monotonic() + 5
    while not handler.received and time.monotonic() < deadline:
        time.sleep(0.05)
    logger.info("second")
    assert shipper.close(timeout=5)
    events = [x.get("message", "") for x in logs.lines()]
    assert any("log shipping to loki failing" in m for m in events)
    assert any("log shipping to loki recovered" in m for m in events)
    assert [x["message"] for x in _shipped(handler)["loki"]] == ["first", "second"]


def test_shipped_records_carry_no_secret(
    logs: Logs, collector: Callable[..., tuple[str, type[Collector]]]
) -> None:
    url, handler = collector(0)
    shipper = logs.setup(loki_url=url, victoria_logs_url=url)
    assert shipper is not None
    _log_secrets_everywhere()
    assert shipper.close(timeout=5)
    bodies = b"".join(body for _, _, body in handler.received).decode()
    assert len(_shipped(handler)["loki"]) == 6
    for secret in SECRETS:
        assert secret not in bodies


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _time_lines(n: int) -> float:
    log = logger.bind(command_id="c-bench", chat="@ru_python", event="progress")
    started = time.perf_counter()
    for i in range(n):
        log.info("page {i} stored", i=i, message_count=100)
    return time.perf_counter() - started


def test_a_down_log_server_neither_slows_logging_nor_grows_memory(logs: Logs) -> None:
    n = 20_000
    with open(os.devnull, "w") as devnull:
        logs.setup(devnull, log_level="INFO")
        _time_lines(200)  # warm up
        baseline = _time_lines(n)

        shipper = logs.setup(
            devnull,
            log_level="INFO",
            loki_url=f"http://127.0.0.1:{_closed_port()}",
            log_queue_max_records=1000,
            log_batch_max_records=100,
            log_batch_max_seconds=0.05,
            log_flush_timeout_seconds=1.0,
        )
        assert shipper is not None
        metrics = WorkerMetrics()
        metrics.watch_log_shipper(shipper)
        with_down_server = _time_lines(n)
        queued = shipper.queued()["loki"]
        started = time.monotonic()
        shipper.close()
        close_s = time.monotonic() - started

    print(
        f"\n{n} lines: no shipping {baseline:.3f}s, log server down {with_down_server:.3f}s, "
        f"close {close_s:.3f}s, dropped {shipper.dropped['loki']}"
    )
    assert with_down_server < 2 * baseline + 0.5
    assert queued <= 1000 + 100, "the queue is bounded"
    dropped = shipper.dropped["loki"]
    assert dropped >= n - 1100
    assert metrics.log_records_dropped_total.labels(sink="loki")._value.get() == dropped
    assert close_s < 2.0, "shutdown flush is bounded"


def test_close_is_bounded_when_the_log_server_hangs(logs: Logs) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        shipper = logs.setup(
            victoria_logs_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            log_flush_timeout_seconds=0.5,
        )
        assert shipper is not None
        for i in range(10):
            logger.info("line {i}", i=i)
        started = time.monotonic()
        shipper.close()
        assert time.monotonic() - started < 2.0
    assert shipper.dropped["victorialogs"] == 10
    assert "records not shipped" in logs.text()


def test_a_rejecting_log_server_costs_the_batch_not_the_process(
    logs: Logs, collector: Callable[..., tuple[str, type[Collector]]]
) -> None:
    url, handler = collector(1, 400)  # the first batch is refused as malformed
    authed = url.replace("http://", "http://ops:p%40ss@")
    shipper = logs.setup(victoria_logs_url=authed, log_batch_max_seconds=0.05)
    assert shipper is not None
    for i in range(3):
        logger.info("refused {i}", i=i)
    deadline = time.monotonic() + 5
    while shipper.dropped["victorialogs"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    logger.info("accepted")
    assert shipper.close(timeout=5)
    assert shipper.dropped["victorialogs"] == 3
    assert [x["message"] for x in _shipped(handler)["victorialogs"]] == ["accepted"]
    assert "rejected a batch with HTTP 400" in logs.text()
    assert set(handler.auth) == {"Basic " + base64.b64encode(b"ops:p@ss").decode()}
    assert "p@ss" not in logs.text() and "p%40ss" not in logs.text()
