"""The small HTTP server each process runs for scraping and health checks.

``/metrics`` is prometheus-client's own exporter (:func:`prometheus_client.make_wsgi_app`: the
text format, OpenMetrics when the scraper asks for it, gzip, ``name[]`` filters); only the
health routes are ours. A stdlib ``wsgiref`` server, one thread per request, runs in a daemon
thread, so it never blocks (nor is blocked by) the asyncio event loop of the daemon:

* ``GET /metrics``: the process's registry.
* ``GET /health``: 200 ``{"status": "ok"}`` when the ``health`` callable returns true, else 503
  ``{"status": "unhealthy"}`` (also 503 when the callable raises). The Docker healthcheck and
  supervisord's eventlisteners can use it.
* ``GET /health/details``: the ``details`` callable's mapping as JSON (seed 003: version,
  Telegram connected, session, Redis, breaker, current command, last success) plus
  ``"healthy"``; same status code as ``/health``. Secrets are masked.
* anything else: 404 with the list of paths.

The callables run in a server thread, not in the event loop: they must only read a snapshot
(plain attributes the daemon updates), never await or touch Redis/Telethon.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from loguru import logger
from prometheus_client import CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from fleet.logs import Scrubber

__all__ = ["DetailsProvider", "HealthCheck", "MetricsServer"]

HealthCheck = Callable[[], bool]
DetailsProvider = Callable[[], Mapping[str, object]]

_PATHS = ["/metrics", "/health", "/health/details"]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape never holds up the process's exit
    allow_reuse_address = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = 10  # a stuck client cannot hold a thread forever
    server_version = "telegram-fetcher"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every 15 s would flood the logs; errors are reported by log_error below.
        return None

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("metrics server: " + (format % args), event="metrics_server_error")


class _App:
    """The WSGI app: our health routes, prometheus-client's app for ``/metrics``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthCheck | None,
        details: DetailsProvider | None,
        scrub: Callable[[str], str],
    ) -> None:
        self.metrics = make_wsgi_app(registry)
        self.health = health
        self.details = details
        self.scrub = scrub

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        if path == "/metrics":
            return self.metrics(environ, start_response)
        if path == "/health":
            healthy = self._healthy()
            status = {"status": "ok" if healthy else "unhealthy"}
            return self._json(start_response, 200 if healthy else 503, status)
        if path == "/health/details":
            return self._details(start_response)
        return self._json(start_response, 404, {"error": "not found", "paths": _PATHS})

    def _healthy(self) -> bool:
        if self.health is None:
            return True
        try:
            return bool(self.health())
        except Exception as exc:  # a failing check is an unhealthy process, not a 500
            logger.warning(
                "health check raised {error_type}",
                error_type=type(exc).__name__,
                event="health_check_error",
            )
            return False

    def _details(self, start_response: StartResponse) -> list[bytes]:
        healthy = self._healthy()
        document: dict[str, object] = {}
        if self.details is not None:
            try:
                document.update(self.details())
            except Exception as exc:  # reported in the document itself
                document["error"] = {"type": type(exc).__name__}
                healthy = False
        document["healthy"] = healthy
        return self._json(start_response, 200 if healthy else 503, document)

    def _json(
        self, start_response: StartResponse, status: int, document: Mapping[str, object]
    ) -> list[bytes]:
        body = self.scrub(json.dumps(document, default=str, ensure_ascii=False)).encode()
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        start_response(
            f"{status} {reason}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]


class MetricsServer:
    """Serves ``/metrics``, ``/health`` and ``/health/details`` from a daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        health: HealthCheck | None = None,
        details: DetailsProvider | None = None,
        scrubber: Scrubber | None = None,
    ) -> None:
        app = _App(registry, health, details, scrubber.text if scrubber else (lambda text: text))
        server_class = _IPv6Server if ":" in host else _Server
        self._server = make_server(
            host, port, app, server_class=server_class, handler_class=_Handler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._stopped = False

    @property
    def host(self) -> str:
        """The address the socket is bound on (``0.0.0.0``: every interface)."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when ``METRICS_PORT=0`` asked for any free port)."""
        return int(self._server.server_address[1])

    @property
    def bound(self) -> str:
        """``http://<bound address>:<port>``, as the socket really listens (for the logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """A URL a client on this host can reach the server at (loopback for a wildcard)."""
        if self.host in ("0.0.0.0", "", "::"):
            host = "[::1]" if self.host == "::" else "127.0.0.1"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.server_close()
