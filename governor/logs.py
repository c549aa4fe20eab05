"""Logging for both programs: loguru, one JSON object per line on stderr, shipped in batches.

:func:`setup_logging` is called once at start by ``python -m worker`` and ``python -m governor``.
What it installs, in the order a record goes through it:

1. **Scrubbing** (a loguru patcher, so it runs before any sink): every configured secret
   (:func:`collect_secrets`: API hash, phone, Redis/Pushgateway passwords, passwords inside log
   URLs) is replaced by ``***`` in the message and in every bound field, and once more in the
   final line, so a secret never reaches stderr nor a log server.
2. **stderr**: ``LOG_FORMAT=json`` (default) writes one JSON object per line with ``ts`` (UTC,
   ISO 8601, ``Z``), ``level``, ``message``, ``service``, ``environment``, ``worker_id``,
   ``component``, every bound extra flattened at top level (``event``, ``chat``,
   ``command_id``, ``mode``, ``duration_ms``, ``error_type``, ``wait_seconds``, …), ``logger``
   and, for an exception, ``exception: {type, message, traceback}``. ``LOG_FORMAT=console`` is
   a one-line human format with the extras as ``key=value``.
3. **Shipping** (only when ``VICTORIA_LOGS_URL`` and/or ``LOKI_URL`` is set): the record is put
   on a bounded in-memory queue per log server and the caller returns at once. One background
   thread per server sends batches (``LOG_BATCH_MAX_RECORDS`` or every
   ``LOG_BATCH_MAX_SECONDS``); when the server is down it backs off (0.5 s doubling to 30 s)
   while the queue fills up to ``LOG_QUEUE_MAX_RECORDS``, after which new records are dropped
   and counted (:attr:`LogShipper.dropped`, metric ``log_records_dropped_total{sink}``). At
   shutdown :meth:`LogShipper.close` flushes with a bounded wait (``LOG_FLUSH_TIMEOUT_SECONDS``).

The "no loop" rule (seed 001): records from this module (the shipper's own status lines) and
from HTTP client libraries (``urllib3``, ``requests``, ``http.client``, ``urllib``, ``httpx``,
``httpcore``) go to stderr but are never shipped, so shipping can never feed on itself.
A record bound with ``_no_ship=True`` stays off the log servers too; extras whose name starts
with ``_`` are never written.

Standard-library ``logging`` (Telethon, redis-py) is routed into loguru at WARNING and above by
:class:`InterceptHandler`.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import random
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

    from governor.settings import FleetSettings

__all__ = [
    "NO_SHIP_LOGGERS",
    "InterceptHandler",
    "LogShipper",
    "Scrubber",
    "collect_secrets",
    "reset_logging",
    "setup_logging",
]

#: Logger-name prefixes whose records are never shipped (the "no loop" filter).
NO_SHIP_LOGGERS: tuple[str, ...] = (
    __name__,
    "urllib3",
    "requests",
    "http.client",
    "urllib",
    "httpx",
    "httpcore",
)
_CORE_KEYS = ("ts", "level", "message", "logger", "exception")
_MASK = "***"
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_HTTP_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------------------------
# scrubbing


def collect_secrets(settings: FleetSettings) -> list[str]:
    """Every secret value the process knows: ``settings.secret_values()`` plus passwords that
    may sit inside the Loki / VictoriaLogs / Pushgateway URLs."""
    out = list(settings.secret_values())
    for url in (settings.loki_url, settings.victoria_logs_url, settings.pushgateway_url):
        if url:
            password = urlsplit(url).password
            if password:
                out.append(password)
    return out


class Scrubber:
    """Replaces secret values by ``***`` in strings and (recursively) in containers.

    Each secret is also matched URL-quoted (as it appears inside a DSN) and, for a phone
    number, without its leading ``+`` (as Telethon prints it)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        variants: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            variants.add(secret)
            variants.add(quote(secret, safe=""))
            stripped = secret.lstrip("+")
            if stripped != secret and len(stripped) >= 6:
                variants.add(stripped)
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(variants, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, _MASK)
        return value

    def value(self, value: object) -> object:
        """A scrubbed copy of ``value``: strings masked, dicts/lists/tuples copied and walked,
        numbers and other scalars unchanged, any other object turned into its masked ``str``."""
        if isinstance(value, str):
            return self.text(value) if self._secrets else value
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        return self.text(str(value)) if self._secrets else value

    def patch_record(self, record: Record) -> None:
        """The loguru patcher: masks the message and every bound field in place."""
        if not self._secrets:
            return
        record["message"] = self.text(record["message"])
        extra = record["extra"]
        for key, val in extra.items():
            extra[key] = self.value(val)


# --------------------------------------------------------------------------------------------
# records → dicts and lines


def _utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Formatter:
    """Turns a loguru record into the flat dict every output shares."""

    def __init__(self, static: Mapping[str, str], scrubber: Scrubber) -> None:
        self._static = dict(static)
        self._scrubber = scrubber

    def payload(self, record: Record) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": _utc_iso(record["time"]),
            "level": record["level"].name,
            "message": record["message"],
        }
        out.update(self._static)
        extra = record["extra"]
        for key, val in extra.items():
            if key.startswith("_"):
                continue
            out[f"x_{key}" if key in _CORE_KEYS else key] = val
        out["logger"] = extra.get("_stdlib_logger") or record["name"]
        exc = record["exception"]
        if exc is not None and exc.type is not None:
            text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
            out["exception"] = {
                "type": exc.type.__name__,
                "message": self._scrubber.text(str(exc.value)),
                "traceback": self._scrubber.text(text),
            }
            out.setdefault("error_type", exc.type.__name__)
        return out

    def json_line(self, payload: Mapping[str, Any]) -> str:
        line = json.dumps(payload, ensure_ascii=False, default=self._default)
        return self._scrubber.text(line) if self._scrubber else line

    def console_line(self, payload: Mapping[str, Any]) -> str:
        skip = {"ts", "level", "message", "service", "environment", "worker_id", "exception"}
        fields = " ".join(
            f"{k}={self._default(v) if not isinstance(v, str | int | float) else v}"
            for k, v in payload.items()
            if k not in skip and v is not None
        )
        line = (
            f"{payload['ts']} | {payload['level']:<8} | {payload.get('worker_id', '-')} | "
            f"{payload['message']}"
        )
        if fields:
            line += f" | {fields}"
        exc = payload.get("exception")
        if isinstance(exc, Mapping):
            line += "\n" + str(exc.get("traceback", "")).rstrip("\n")
        return self._scrubber.text(line) if self._scrubber else line

    def _default(self, value: object) -> str:
        return self._scrubber.text(str(value))


def _shippable(record: Record) -> bool:
    extra = record["extra"]
    if extra.get("_no_ship"):
        return False
    name = extra.get("_stdlib_logger") or record["name"] or ""
    return not any(name == p or name.startswith(p + ".") for p in NO_SHIP_LOGGERS)


class _Sink:
    """The one loguru sink: stderr line + (optionally) the shipping queues."""

    def __init__(self, formatter: _Formatter, fmt: str, shipper: LogShipper | None) -> None:
        self._formatter = formatter
        self._json = fmt == "json"
        self._shipper = shipper

    def __call__(self, message: Message) -> None:
        record = message.record
        payload = self._formatter.payload(record)
        if self._json:
            line = self._formatter.json_line(payload)
        else:
            line = self._formatter.console_line(payload)
        # Looked up on every call: tests and supervisord may swap stderr.
        sys.stderr.write(line + "\n")
        if self._shipper is not None and _shippable(record):
            self._shipper.offer(payload)


# --------------------------------------------------------------------------------------------
# stdlib logging → loguru


class InterceptHandler(logging.Handler):
    """Routes stdlib ``logging`` records (Telethon, redis-py, urllib3) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back  # type: ignore[assignment]
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).bind(_stdlib_logger=record.name).log(
            level, record.getMessage()
        )


def _install_intercept(level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, InterceptHandler):
            root.removeHandler(handler)
    root.addHandler(InterceptHandler())
    root.setLevel(level)


def _remove_intercept() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, InterceptHandler):
            root.removeHandler(handler)


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


def _victoria_target(url: str, dumps: Callable[[Mapping[str, Any]], str]) -> _Target:
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


def _loki_target(url: str, dumps: Callable[[Mapping[str, Any]], str]) -> _Target:
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


def _build_shipper(settings: FleetSettings, formatter: _Formatter) -> LogShipper | None:
    targets = []
    if settings.victoria_logs_url:
        targets.append(_victoria_target(settings.victoria_logs_url, formatter.json_line))
    if settings.loki_url:
        targets.append(_loki_target(settings.loki_url, formatter.json_line))
    if not targets:
        return None
    return LogShipper(
        targets,
        max_records=settings.log_queue_max_records,
        batch_max_records=settings.log_batch_max_records,
        batch_max_seconds=settings.log_batch_max_seconds,
        flush_timeout_s=settings.log_flush_timeout_seconds,
    )


# --------------------------------------------------------------------------------------------
# setup


_active_shipper: LogShipper | None = None
_atexit_registered = False


def setup_logging(
    settings: FleetSettings,
    *,
    service: str = "telegram-fetcher",
    worker_id: str,
    component: str,
) -> LogShipper | None:
    """Install the process's logging (see the module docstring). Returns the shipper when a
    log server is configured, so the daemon can count its drops and close it at shutdown.

    Calling it again replaces the previous setup (closing the previous shipper)."""
    global _atexit_registered, _active_shipper
    reset_logging()
    scrubber = Scrubber(collect_secrets(settings))
    static = {
        "service": service,
        "environment": settings.environment,
        "worker_id": worker_id,
        "component": component,
    }
    formatter = _Formatter(static, scrubber)
    shipper = _build_shipper(settings, formatter)
    logger.configure(patcher=scrubber.patch_record)
    logger.add(
        _Sink(formatter, settings.log_format, shipper),
        level=settings.log_level,
        format="{message}",
        backtrace=False,
        diagnose=False,  # diagnose prints local variables: secrets would leak
        catch=True,
    )
    _install_intercept(logging.WARNING)
    if shipper is not None:
        shipper.start()
        _active_shipper = shipper
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_close_at_exit)
    return shipper


def reset_logging(timeout: float = 1.0) -> None:
    """Undo :func:`setup_logging`: close the shipper (bounded), drop every loguru sink and the
    stdlib intercept. Used between tests and by :func:`setup_logging` itself."""
    global _active_shipper
    shipper, _active_shipper = _active_shipper, None
    if shipper is not None:
        shipper.close(timeout)  # before the sinks go, so its last words reach stderr
    logger.remove()
    logger.configure(patcher=_no_patch)
    _remove_intercept()


def _no_patch(record: Record) -> None:
    return None


def _close_at_exit() -> None:
    # A safety net: daemons close the shipper themselves during their staged shutdown.
    if _active_shipper is not None:
        _active_shipper.close()
