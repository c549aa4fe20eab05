"""How the metrics registry leaves the process: the ``/metrics`` + ``/health`` server and the
Pushgateway pusher, started and stopped together (:class:`Exporters`).

The registry itself and its metrics live in :mod:`fleet.metrics`; the server in
:mod:`fleet.httpserver`, the pusher in :mod:`fleet.push`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger
from prometheus_client import CollectorRegistry

from fleet.httpserver import DetailsProvider, HealthCheck, MetricsServer
from fleet.push import Pusher
from fleet.settings import ConfigError

if TYPE_CHECKING:
    from fleet.settings import FleetSettings


_log = logger


@dataclass
class Exporters:
    """What :func:`start_exporters` started; :meth:`stop` undoes it, idempotently."""

    mode: str
    server: MetricsServer | None = None
    pusher: Pusher | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the metrics/health server, if one runs."""
        return self.server.url if self.server is not None else None

    def stop(self, timeout: float = 5.0, *, delete_group: bool = True) -> None:
        """Last push (then delete the group unless ``delete_group=False``), stop serving.

        Blocking for at most about ``timeout`` seconds; call it last in the shutdown, after
        the final metric updates (from async code: ``await asyncio.to_thread(ex.stop)``)."""
        if self._stopped:
            return
        self._stopped = True
        if self.pusher is not None:
            self.pusher.stop(timeout, delete_group=delete_group)
        if self.server is not None:
            self.server.stop()


def start_exporters(
    settings: FleetSettings,
    registry: CollectorRegistry,
    *,
    job: str,
    instance: str,
    health: HealthCheck | None = None,
    details: DetailsProvider | None = None,
    secrets: Iterable[str] | None = None,
    port: int | None = None,
) -> Exporters:
    """Start the HTTP server and/or the pusher:

    * ``METRICS_PORT`` > 0 (or an explicit ``port``; ``port=0`` binds any free port, for tests
      and one-shot runs): the HTTP server on ``METRICS_HOST`` serving ``/metrics``,
      ``/health`` and ``/health/details``, whatever the mode, so health checks always work.
      ``METRICS_PORT=0`` (the default) means no server; in ``scrape``/``both`` mode that is
      logged as a warning, since nothing can be scraped.
    * ``METRICS_MODE`` ``push``/``both`` (``both`` is the production default): a thread
      pushing to ``PUSHGATEWAY_URL`` every ``PUSH_INTERVAL_SECONDS`` under the grouping key
      ``{job, instance}``.

    Raises :class:`ConfigError` when push was asked for explicitly without
    ``PUSHGATEWAY_URL``; when it is only the production default, push is skipped with a
    warning. ``secrets`` are masked in ``/health/details`` (default: all of the settings')."""
    mode = settings.effective_metrics_mode
    push = _wants_push(settings)  # first: a configuration error must not leave a server behind
    exporters = Exporters(mode=mode)
    if port is not None or settings.metrics_port > 0:
        bind_port = settings.metrics_port if port is None else port
        exporters.server = _serve(settings, registry, bind_port, health, details, secrets)
    elif mode in ("scrape", "both"):
        _log.warning(
            "METRICS_MODE={mode} but METRICS_PORT=0: no /metrics or /health is served",
            mode=mode,
            event="metrics_server_disabled",
        )
    if push:
        exporters.pusher = _pusher(settings, registry, job=job, instance=instance)
    return exporters


def _wants_push(settings: FleetSettings) -> bool:
    """Push when the mode asks for it; without ``PUSHGATEWAY_URL`` that is a configuration error
    if the mode was set explicitly, a warning if it is only the production default."""
    mode = settings.effective_metrics_mode
    if mode not in ("push", "both"):
        return False
    if settings.pushgateway_url:
        return True
    if settings.metrics_mode is not None:
        raise ConfigError(f"PUSHGATEWAY_URL: required when METRICS_MODE={mode}")
    _log.warning(
        "METRICS_MODE defaults to both in production but PUSHGATEWAY_URL is not set; "
        "metrics are not pushed",
        event="metrics_push_disabled",
    )
    return False


def _serve(
    settings: FleetSettings,
    registry: CollectorRegistry,
    port: int,
    health: HealthCheck | None,
    details: DetailsProvider | None,
    secrets: Iterable[str] | None,
) -> MetricsServer:
    from fleet.logs import Scrubber, collect_secrets

    scrubber = Scrubber(collect_secrets(settings) if secrets is None else secrets)
    server = MetricsServer(
        registry,
        host=settings.metrics_host,
        port=port,
        health=health,
        details=details,
        scrubber=scrubber,
    ).start()
    # The address the socket is really bound on (0.0.0.0 means every interface), not a
    # loopback URL: an operator reading this must know what is exposed.
    _log.info(
        "metrics and health served on {address}",
        address=server.bound,
        event="metrics_server_started",
        mode=settings.effective_metrics_mode,
    )
    return server


def _pusher(
    settings: FleetSettings, registry: CollectorRegistry, *, job: str, instance: str
) -> Pusher:
    """A started pusher to ``PUSHGATEWAY_URL`` under the grouping key ``{job, instance}``."""
    assert settings.pushgateway_url is not None
    password = settings.pushgateway_password
    return Pusher(
        url=settings.pushgateway_url,
        job=job,
        instance=instance,
        registry=registry,
        interval_s=settings.push_interval_seconds,
        username=settings.pushgateway_username,
        password=password.get_secret_value() if password is not None else None,
    ).start()


def start_push_only(
    settings: FleetSettings, registry: CollectorRegistry, *, job: str, instance: str
) -> Exporters | None:
    """For one-shot runs (``python -m worker fetch``): push only, and only when it is configured
    (``PUSHGATEWAY_URL`` set and ``METRICS_MODE`` push/both); never a server, never an error.
    Stop it with ``exporters.stop(delete_group=False)`` so the run's last values stay."""
    if settings.effective_metrics_mode not in ("push", "both") or not settings.pushgateway_url:
        return None
    pusher = _pusher(settings, registry, job=job, instance=instance)
    return Exporters(mode="push", pusher=pusher)


def health_details(
    *,
    version: str,
    telegram_connected: bool | None = None,
    session: str | None = None,
    redis_ok: bool | None = None,
    breaker: str | None = None,
    current_command: Mapping[str, object] | None = None,
    last_success: str | None = None,
    **more: object,
) -> dict[str, object]:
    """The ``/health/details`` document (seed 003's fields) in one consistent shape."""
    return {
        "version": version,
        "telegram": {"connected": telegram_connected, "session": session},
        "redis": {"ok": redis_ok},
        "breaker": breaker,
        "current_command": dict(current_command) if current_command is not None else None,
        "last_success": last_success,
        **more,
    }
