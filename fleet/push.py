"""Pushing a registry to the Prometheus Pushgateway, and deleting the groups of dead workers.

Each process pushes its whole registry (HTTP PUT, replacing its group) under the grouping key
``{job, instance=<worker_id>}`` every ``PUSH_INTERVAL_SECONDS`` from a background thread, once
more at exit, and then deletes its own group so dashboards show no ghost. The Pushgateway never
forgets a group by itself (its issues #19, #117, #527 decline a TTL), and a worker killed with
SIGKILL cannot delete its own: the governor calls :func:`reap_dead_groups` (or
:func:`delete_group`) for workers whose heartbeat has expired.

Failures are logged once per change of state (failing / recovered) and never raised.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import (
    basic_auth_handler,
    default_handler,
    delete_from_gateway,
    push_to_gateway,
)

if TYPE_CHECKING:
    from fleet.settings import FleetSettings

__all__ = ["PushGroup", "Pusher", "delete_group", "list_groups", "reap_dead_groups", "stale_groups"]

_MAX_HTTP_TIMEOUT_S = 10.0


def _endpoint(
    url: str, username: str | None, password: str | None
) -> tuple[str, str | None, str | None]:
    """Split credentials out of ``http://user:pass@host`` (explicit settings win)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.username is not None or parts.password is not None:
        username = username or unquote(parts.username or "")
        password = password or unquote(parts.password or "")
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts).rstrip("/"), username, password


def _handler(username: str | None, password: str | None) -> Callable[..., Callable[[], None]]:
    if username is not None and password is not None:
        return partial(basic_auth_handler, username=username, password=password)
    return default_handler


def _error_name(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        return type(reason).__name__
    code = getattr(exc, "code", None)
    return f"HTTP {code}" if isinstance(code, int) else type(exc).__name__


class Pusher:
    """Pushes ``registry`` on an interval from a daemon thread; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        job: str,
        instance: str,
        registry: CollectorRegistry,
        interval_s: float,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.url, username, password = _endpoint(url, username, password)
        self.job = job
        self.grouping_key = {"instance": instance}
        self._registry = registry
        self._interval_s = interval_s
        self._handler = _handler(username, password)
        self._timeout_s = min(_MAX_HTTP_TIMEOUT_S, max(1.0, interval_s))
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one push at a time (thread vs. final push)
        self._failing = False
        self.pushes = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="metrics-pusher", daemon=True)

    def start(self) -> Pusher:
        self._thread.start()
        return self

    def push_now(self, timeout: float | None = None) -> bool:
        """One push; True on success. Never raises, never waits much beyond ``timeout``."""
        timeout = timeout or self._timeout_s
        # The interval thread may be stuck in a push to a hanging gateway: don't queue behind it.
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            push_to_gateway(
                self.url,
                job=self.job,
                registry=self._registry,
                grouping_key=self.grouping_key,
                timeout=timeout,
                handler=self._handler,
            )
        except Exception as exc:  # any failure is logged once, never raised
            self.failures += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "pushing metrics to the Pushgateway failing ({error_type}); "
                    "will keep trying every {interval}s",
                    error_type=_error_name(exc),
                    interval=self._interval_s,
                    event="metrics_push_failing",
                )
            return False
        else:
            self.pushes += 1
            if self._failing:
                self._failing = False
                logger.info(
                    "pushing metrics to the Pushgateway recovered", event="metrics_push_recovered"
                )
            return True
        finally:
            self._lock.release()

    def stop(self, timeout: float = 5.0, *, delete_group: bool = True) -> None:
        """Stop the thread, push once more, then delete the group (unless asked not to, e.g.
        by a one-shot run whose last values should stay). Bounded by about ``timeout``."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        remaining = deadline - time.monotonic()
        if remaining > 0.1:
            self.push_now(timeout=min(self._timeout_s, remaining))
        remaining = deadline - time.monotonic()
        if delete_group and remaining > 0.1:
            _delete(
                self.url,
                self.job,
                self.grouping_key,
                self._handler,
                timeout=min(self._timeout_s, remaining),
            )

    def _run(self) -> None:
        self.push_now()
        while not self._stop.wait(self._interval_s):
            self.push_now()


def _delete(
    url: str,
    job: str,
    grouping_key: Mapping[str, str],
    handler: Callable[..., Any],
    *,
    timeout: float,
) -> bool:
    try:
        delete_from_gateway(
            url, job=job, grouping_key=dict(grouping_key), timeout=timeout, handler=handler
        )
    except Exception as exc:  # reported, never raised
        logger.warning(
            "deleting Pushgateway group {job}/{instance} failed ({error_type})",
            job=job,
            instance=grouping_key.get("instance"),
            error_type=_error_name(exc),
            event="metrics_group_delete_failed",
        )
        return False
    return True


def _settings_endpoint(settings: FleetSettings) -> tuple[str, str | None, str | None] | None:
    if not settings.pushgateway_url:
        return None
    password = settings.pushgateway_password
    return _endpoint(
        settings.pushgateway_url,
        settings.pushgateway_username,
        password.get_secret_value() if password is not None else None,
    )


def delete_group(settings: FleetSettings, job: str, instance: str, *, timeout: float = 5.0) -> bool:
    """Delete the Pushgateway group ``{job, instance}`` (e.g. of a worker killed with -9).
    True when the Pushgateway accepted it (also when the group did not exist); never raises."""
    endpoint = _settings_endpoint(settings)
    if endpoint is None:
        return False
    url, user, pw = endpoint
    return _delete(url, job, {"instance": instance}, _handler(user, pw), timeout=timeout)


@dataclass(frozen=True)
class PushGroup:
    """One group held by the Pushgateway."""

    labels: Mapping[str, str]
    last_push_unix: float | None  # from the Pushgateway's own push_time_seconds

    @property
    def job(self) -> str:
        return self.labels.get("job", "")

    @property
    def instance(self) -> str:
        return self.labels.get("instance", "")


def list_groups(settings: FleetSettings, *, timeout: float = 5.0) -> list[PushGroup] | None:
    """The groups the Pushgateway holds (``GET /api/v1/metrics``); None if it cannot be read."""
    endpoint = _settings_endpoint(settings)
    if endpoint is None:
        return None
    url, user, pw = endpoint
    request = urllib.request.Request(f"{url}/api/v1/metrics", method="GET")
    if user is not None and pw is not None:
        token = base64.b64encode(f"{user}:{pw}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            document = json.loads(response.read())
    except Exception as exc:  # reported, never raised
        logger.warning(
            "reading Pushgateway groups failed ({error_type})",
            error_type=_error_name(exc),
            event="metrics_groups_read_failed",
        )
        return None
    groups = []
    for item in document.get("data", []):
        labels = {str(k): str(v) for k, v in (item.get("labels") or {}).items()}
        last: float | None = None
        push_time = item.get("push_time_seconds") or {}
        for metric in push_time.get("metrics", []):
            try:
                last = float(metric["value"])
            except (KeyError, TypeError, ValueError):
                continue
        groups.append(PushGroup(labels=labels, last_push_unix=last))
    return groups


def stale_groups(
    groups: Iterable[PushGroup],
    *,
    job: str,
    live_instances: Iterable[str],
    now_unix: float,
    min_age_s: float,
) -> list[str]:
    """Instances of ``job`` that are not live and have not pushed for ``min_age_s`` seconds.

    Pure: the governor passes the instances whose heartbeat is current. ``min_age_s`` (say two
    push intervals) spares a worker that has pushed before its first heartbeat was seen."""
    live = set(live_instances)
    out = []
    for group in groups:
        if group.job != job or not group.instance or group.instance in live:
            continue
        if group.last_push_unix is not None and now_unix - group.last_push_unix < min_age_s:
            continue
        out.append(group.instance)
    return sorted(set(out))


def reap_dead_groups(
    settings: FleetSettings,
    *,
    job: str,
    live_instances: Iterable[str],
    min_age_s: float,
    now_unix: float | None = None,
) -> list[str]:
    """Delete the groups of ``job`` whose instance is not live; returns the instances deleted."""
    groups = list_groups(settings)
    if not groups:
        return []
    doomed = stale_groups(
        groups,
        job=job,
        live_instances=live_instances,
        now_unix=time.time() if now_unix is None else now_unix,
        min_age_s=min_age_s,
    )
    deleted = [i for i in doomed if delete_group(settings, job, i)]
    if deleted:
        logger.info(
            "deleted Pushgateway groups of dead workers: {instances}",
            instances=",".join(deleted),
            event="metrics_groups_reaped",
        )
    return deleted
