"""Shipping log records to VictoriaLogs and Loki: bounded queues drained by background threads.

One :class:`LogShipper` per process, built by :func:`fleet.logs.setup_logging` when
``VICTORIA_LOGS_URL`` and/or ``LOKI_URL`` is set. A record is put on a bounded in-memory queue
per log server and the caller returns at once; one thread per server sends batches, backs off
while the server is down, drops (and counts) what does not fit, and flushes with a bounded wait
at shutdown. Records of this module and of HTTP client libraries are never shipped (see
``fleet.logs.NO_SHIP_LOGGERS``), so shipping cannot feed on itself.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from loguru import logger

_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_HTTP_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------------------------
# shipping


class DropCounter(Protocol):
    """What :meth:`LogShipper.count_drops_in` needs: a prometheus ``Counter`` with ``sink``."""

    def labels(self, *labelvalues: str, **labelkwargs: str) -> Any: ...


Entry = tuple[int, dict[str, Any]]  # (unix time in ns, payload)


class _Target:
    """One log server: URL, headers and how a batch is encoded."""

    def __init__(self, name: str, url: str, encode: Callable[[list[Entry]], bytes]) -> None:
        parts = urlsplit(url)
        self.headers: dict[str, str] = {}
        if parts.username is not None or parts.password is not None:
            user = unquote(parts.username or "")
            password = unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        self.name = name
        self.url = urlunsplit(parts)
        self.encode = encode


def victoria_target(url: str, dumps: Callable[[Mapping[str, Any]], str]) -> _Target:
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/insert/jsonline"
    query = dict(parse_qsl(parts.query))
    query.setdefault("_stream_fields", "service,environment,component")
    query.setdefault("_time_field", "ts")
    query.setdefault("_msg_field", "message")
    full = urlunsplit(parts._replace(path=path, query=urlencode(query)))

    def encode(batch: list[Entry]) -> bytes:
        return "".join(dumps(p) + "\n" for _, p in batch).encode()

    target = _Target("victorialogs", full, encode)
    target.headers["Content-Type"] = "application/stream+json"
    return target


def loki_target(url: str, dumps: Callable[[Mapping[str, Any]], str]) -> _Target:
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/loki/api/v1/push"):
        path += "/loki/api/v1/push"
    full = urlunsplit(parts._replace(path=path))
    label_keys = ("service", "environment", "component")

    def encode(batch: list[Entry]) -> bytes:
        # Labels stay few and bounded (worker_id, chat, command_id are in the JSON line).
        streams: dict[tuple[str, ...], list[list[str]]] = {}
        for ts_ns, p in batch:
            key = (*(str(p.get(k, "")) for k in label_keys), str(p.get("level", "")).lower())
            streams.setdefault(key, []).append([str(ts_ns), dumps(p)])
        body = {
            "streams": [
                {
                    "stream": {**dict(zip(label_keys, key, strict=False)), "level": key[-1]},
                    "values": values,
                }
                for key, values in streams.items()
            ]
        }
        return json.dumps(body, ensure_ascii=False).encode()

    target = _Target("loki", full, encode)
    target.headers["Content-Type"] = "application/json"
    return target


class _TargetWorker:
    """A bounded queue and the thread that drains it to one log server."""

    def __init__(
        self,
        target: _Target,
        *,
        max_records: int,
        batch_max_records: int,
        batch_max_seconds: float,
        on_drop: Callable[[str, int], None],
    ) -> None:
        self.target = target
        self._queue: deque[Entry] = deque()
        self._max = max_records
        self._batch_max = batch_max_records
        self._batch_s = batch_max_seconds
        self._on_drop = on_drop
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._pending: list[Entry] | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST_S
        self._failures = 0
        self._failing = False
        self._rejected_logged = False
        self.shipped = 0
        self.batches = 0
        self._thread = threading.Thread(
            target=self._run, name=f"log-shipper-{target.name}", daemon=True
        )

    # -- caller side (any thread, must never block) -------------------------------------------
    def offer(self, entry: Entry) -> None:
        if len(self._queue) >= self._max:
            self._on_drop(self.target.name, 1)
            return
        self._queue.append(entry)
        if len(self._queue) >= self._batch_max and not self._wake.is_set():
            self._wake.set()

    def queued(self) -> int:
        return len(self._queue) + len(self._pending or ())

    def start(self) -> None:
        self._thread.start()

    def stop(self, deadline: float) -> None:
        self._deadline = deadline
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                # Backing off: sleep on the stop event, not on the wake event that a full
                # queue keeps setting (that would spin and steal the caller's CPU).
                self._stop.wait(delay)
                continue
            self._wake.wait(self._batch_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._drain(final=False)
        self._drain(final=True)

    def _take(self) -> list[Entry]:
        batch: list[Entry] = []
        queue = self._queue
        for _ in range(min(self._batch_max, len(queue))):
            batch.append(queue.popleft())
        return batch

    def _drain(self, *, final: bool) -> None:
        while True:
            if self._pending is None:
                batch = self._take()
                if not batch:
                    return
                self._pending = batch
            timeout = _HTTP_TIMEOUT_S
            if final:
                remaining = (self._deadline or 0.0) - time.monotonic()
                if remaining <= 0.05:
                    self._abandon("shutdown deadline reached")
                    return
                timeout = min(timeout, remaining)
            outcome = self._send(self._pending, timeout)
            if outcome == "ok":
                self.shipped += len(self._pending)
                self.batches += 1
                self._pending = None
                self._on_success()
            elif outcome == "reject":
                self._on_drop(self.target.name, len(self._pending))
                self._pending = None
            else:
                self._on_failure(outcome)
                if final:
                    self._abandon(f"server unreachable at shutdown ({outcome})")
                return
            if not final and len(self._queue) < self._batch_max:
                return

    def _send(self, batch: list[Entry], timeout: float) -> str:
        """``ok``, ``reject`` (4xx: the batch will never be accepted) or an error name."""
        try:
            body = self.target.encode(batch)
            request = urllib.request.Request(
                self.target.url, data=body, headers=self.target.headers, method="POST"
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
            return "ok"
        except urllib.error.HTTPError as exc:
            exc.close()
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                self._log_once_rejected(exc.code)
                return "reject"
            return f"HTTP {exc.code}"
        except Exception as exc:  # the shipper must survive anything
            reason = getattr(exc, "reason", None)
            return (
                type(reason).__name__ if isinstance(reason, BaseException) else type(exc).__name__
            )

    def _abandon(self, why: str) -> None:
        lost = len(self._pending or ()) + len(self._queue)
        self._pending = None
        self._queue.clear()
        if lost:
            self._on_drop(self.target.name, lost)
            logger.warning(
                "log shipping to {sink} gave up: {why}; {lost} records not shipped",
                sink=self.target.name,
                why=why,
                lost=lost,
            )

    def _on_success(self) -> None:
        if self._failing:
            logger.info(
                "log shipping to {sink} recovered after {failures} failed attempts",
                sink=self.target.name,
                failures=self._failures,
            )
        self._failing = False
        self._failures = 0
        self._backoff = _BACKOFF_FIRST_S
        self._retry_at = 0.0

    def _on_failure(self, error: str) -> None:
        self._failures += 1
        if not self._failing:
            self._failing = True
            logger.warning(
                "log shipping to {sink} failing ({error_type}); retrying with backoff, "
                "dropping records beyond {max} queued",
                sink=self.target.name,
                error_type=error,
                max=self._max,
            )
        jitter = random.uniform(0.8, 1.2)
        self._retry_at = time.monotonic() + self._backoff * jitter
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)

    def _log_once_rejected(self, code: int) -> None:
        if not self._rejected_logged:
            self._rejected_logged = True
            logger.error(
                "log server {sink} rejected a batch with HTTP {code}; such batches are dropped",
                sink=self.target.name,
                code=code,
            )


class LogShipper:
    """Ships log records to VictoriaLogs and/or Loki from bounded queues, off the hot path.

    Built by :func:`setup_logging`; the daemon only calls :meth:`count_drops_in` once its
    metrics exist and :meth:`close` at shutdown."""

    def __init__(
        self,
        targets: Iterable[_Target],
        *,
        max_records: int,
        batch_max_records: int,
        batch_max_seconds: float,
        flush_timeout_s: float,
    ) -> None:
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {}
        self._counter: DropCounter | None = None
        self._flush_timeout_s = flush_timeout_s
        self._closed = False
        self._workers = [
            _TargetWorker(
                t,
                max_records=max_records,
                batch_max_records=batch_max_records,
                batch_max_seconds=batch_max_seconds,
                on_drop=self._count_drop,
            )
            for t in targets
        ]
        for w in self._workers:
            self._dropped[w.target.name] = 0

    @property
    def sinks(self) -> list[str]:
        """Names of the configured log servers (``victorialogs``, ``loki``)."""
        return [w.target.name for w in self._workers]

    @property
    def dropped(self) -> dict[str, int]:
        """Records dropped so far, per sink (queue full, rejected, or lost at shutdown)."""
        with self._lock:
            return dict(self._dropped)

    def queued(self) -> dict[str, int]:
        """Records waiting per sink (never more than ``LOG_QUEUE_MAX_RECORDS`` + one batch)."""
        return {w.target.name: w.queued() for w in self._workers}

    def shipped(self) -> dict[str, int]:
        return {w.target.name: w.shipped for w in self._workers}

    def count_drops_in(self, counter: DropCounter) -> None:
        """Mirror drops into ``log_records_dropped_total{sink}`` from now on (and those so far)."""
        with self._lock:
            self._counter = counter
            for sink, n in self._dropped.items():
                child = counter.labels(sink=sink)
                if n:
                    child.inc(n)

    def offer(self, payload: dict[str, Any]) -> None:
        """Queue one record for every sink; never blocks, never raises."""
        entry = (time.time_ns(), payload)
        for w in self._workers:
            w.offer(entry)

    def start(self) -> None:
        for w in self._workers:
            w.start()

    def close(self, timeout: float | None = None) -> bool:
        """Flush what can be flushed within ``timeout`` seconds (default
        ``LOG_FLUSH_TIMEOUT_SECONDS``) and stop the threads. Idempotent; True if all stopped."""
        wait = self._flush_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        if not self._closed:
            self._closed = True
            for w in self._workers:
                w.stop(deadline)
        ok = True
        for w in self._workers:
            ok = w.join(deadline - time.monotonic() + 0.5) and ok
        return ok

    def _count_drop(self, sink: str, n: int) -> None:
        with self._lock:
            self._dropped[sink] = self._dropped.get(sink, 0) + n
            counter = self._counter
        if counter is not None:
            counter.labels(sink=sink).inc(n)
