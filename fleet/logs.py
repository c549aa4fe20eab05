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

The "no loop" rule (seed 001): records from this module and `fleet.logship` (the shipper) and
from HTTP client libraries (``urllib3``, ``requests``, ``http.client``, ``urllib``, ``httpx``,
``httpcore``) go to stderr but are never shipped, so shipping can never feed on itself.
A record bound with ``_no_ship=True`` stays off the log servers too; extras whose name starts
with ``_`` are never written.

Standard-library ``logging`` (Telethon, redis-py) is routed into loguru at WARNING and above by
:class:`InterceptHandler`.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from loguru import logger

from fleet.logship import LogShipper, loki_target, victoria_target

if TYPE_CHECKING:
    from loguru import Message, Record

    from fleet.settings import FleetSettings

__all__ = [
    "NO_SHIP_LOGGERS",
    "InterceptHandler",
    "LogShipper",
    "Scrubber",
    "active_shipper",
    "collect_secrets",
    "reset_logging",
    "setup_logging",
]

#: Logger-name prefixes whose records are never shipped (the "no loop" filter).
NO_SHIP_LOGGERS: tuple[str, ...] = (
    __name__,
    "fleet.logship",
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


def _build_shipper(settings: FleetSettings, formatter: _Formatter) -> LogShipper | None:
    targets = []
    if settings.victoria_logs_url:
        targets.append(victoria_target(settings.victoria_logs_url, formatter.json_line))
    if settings.loki_url:
        targets.append(loki_target(settings.loki_url, formatter.json_line))
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


def active_shipper() -> LogShipper | None:
    """The shipper the last :func:`setup_logging` built (None: no log server configured), for a
    daemon that set up logging before its metrics existed (the governor's command line)."""
    return _active_shipper


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
