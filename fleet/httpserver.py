"""The small HTTP server each process runs for scraping and health checks.

Stdlib ``ThreadingHTTPServer`` in a daemon thread, so it never blocks (nor is blocked by) the
asyncio event loop of the daemon:

* ``GET /metrics``: the process's registry in the Prometheus text format (OpenMetrics when the
  scraper asks for it).
* ``GET /health``: 200 ``{"status": "ok"}`` when the ``health`` callable returns true, else 503
  ``{"status": "unhealthy"}`` (also 503 when the callable raises). The Docker healthcheck and
  supervisord's eventlisteners can use it.
* ``GET /health/details``: the ``details`` callable's mapping as JSON (seed 003: version,
  Telegram connected, session, Redis, breaker, current command, last success) plus
  ``"healthy"``; same status code as ``/health``. Secrets are masked.

The callables run in a server thread, not in the event loop: they must only read a snapshot
(plain attributes the daemon updates), never await or touch Redis/Telethon.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from fleet.logs import Scrubber

__all__ = ["DetailsProvider", "HealthCheck", "MetricsServer"]

HealthCheck = Callable[[], bool]
DetailsProvider = Callable[[], Mapping[str, object]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Filled in by MetricsServer before serving.
    registry: CollectorRegistry
    health: HealthCheck | None
    details: DetailsProvider | None
    scrub: Callable[[str], str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stuck client cannot hold a thread forever
    server_version = "telegram-fetcher"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/metrics":
            self._metrics()
        elif path == "/health":
            healthy = self._healthy()
            status = {"status": "ok" if healthy else "unhealthy"}
            self._json(200 if healthy else 503, status)
        elif path == "/health/details":
            self._details()
        else:
            self._json(
                404, {"error": "not found", "paths": ["/metrics", "/health", "/health/details"]}
            )

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        self._send(200, body, content_type)

    def _healthy(self) -> bool:
        check = self.server.health
        if check is None:
            return True
        try:
            return bool(check())
        except Exception as exc:  # a failing check is an unhealthy process, not a 500
            logger.warning(
                "health check raised {error_type}",
                error_type=type(exc).__name__,
                event="health_check_error",
            )
            return False

    def _details(self) -> None:
        healthy = self._healthy()
        document: dict[str, object] = {}
        provider = self.server.details
        if provider is not None:
            try:
                document.update(provider())
            except Exception as exc:  # reported in the document itself
                document["error"] = {"type": type(exc).__name__}
                healthy = False
        document["healthy"] = healthy
        self._json(200 if healthy else 503, document)

    def _json(self, status: int, document: Mapping[str, object]) -> None:
        text = self.server.scrub(json.dumps(document, default=str, ensure_ascii=False))
        self._send(status, text.encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every 15 s would flood the logs; errors are reported by log_error below.
        return None

    def log_error(self, format: str, *args: object) -> None:
        logger.debug("metrics server: " + (format % args), event="metrics_server_error")


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
        self._server = _Server((host, port), _Handler, bind_and_activate=True)
        self._server.registry = registry
        self._server.health = health
        self._server.details = details
        self._server.scrub = scrubber.text if scrubber else (lambda text: text)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._stopped = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when ``METRICS_PORT=0`` asked for any free port)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
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
