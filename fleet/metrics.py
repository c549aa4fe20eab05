"""Every Prometheus metric of both programs, and how they leave the process.

Each process builds **one** facade on a private ``CollectorRegistry`` (never the global one):
:class:`WorkerMetrics` in ``python -m worker``, :class:`GovernorMetrics` in
``python -m governor``. The metric objects are plain attributes named exactly like the exported
series (``metrics.retries_total.labels(target="telegram", reason="timeout").inc()``); a few
helpers apply the label caps. :func:`fleet.exporters.start_exporters` then serves the registry
(when ``METRICS_PORT`` is set) and pushes it (``METRICS_MODE=push|both``).

Bounded labels (the whole fleet's series count must not grow with the data):

* ``chat`` (``fetch_duration_seconds``, ``fetch_lag_seconds``): the first
  ``METRICS_CHAT_LABEL_MAX`` (default 50) distinct chats a process sees keep their own label;
  every later chat is reported as ``chat="other"`` (for the lag gauge the last write wins).
  Always pass a chat through :meth:`WorkerMetrics.chat_label` or use the helpers.
* ``session`` (``flood_waits_total``): likewise capped by ``METRICS_SESSION_LABEL_MAX``.
* ``request_class`` is one of ``history|resolve|other`` (:data:`fleet.gate.REQUEST_CLASSES`);
  ``target``, ``reason``, ``source``, ``type``, ``component``, ``status``, ``sink`` take values
  from small fixed sets chosen by the code (error class names, never messages or ids).
* No label ever carries a command id, a message id, a user id or a secret.

Under Pushgateway the grouping key ``{job, instance=<worker_id>}`` is added to every series.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.process_collector import ProcessCollector

from fleet.gate import REQUEST_CLASSES
from fleet.push import delete_group, list_groups, reap_dead_groups, stale_groups

if TYPE_CHECKING:
    from fleet.logs import LogShipper

__all__ = [
    "BREAKER_CLOSED",
    "BREAKER_HALF_OPEN",
    "BREAKER_OPEN",
    "FETCH_DURATION_BUCKETS",
    "FETCH_JOB",
    "GOVERNOR_JOB",
    "OVERFLOW_LABEL",
    "RATE_LIMIT_HITS",
    "RETRIES",
    "TOKEN_WAIT_BUCKETS",
    "WORKER_JOB",
    "CommonMetrics",
    "LabelCap",
    "delete_group",
    "exported_names",
    "list_groups",
    "package_version",
    "reap_dead_groups",
    "stale_groups",
]

#: Pushgateway ``job`` (and Prometheus scrape job names in ``deploy/prometheus``).
WORKER_JOB = "telegram-fetcher-worker"
GOVERNOR_JOB = "telegram-fetcher-governor"
#: One-shot ``python -m worker fetch`` runs (cron): their group is kept after exit, so the last
#: run's values stay visible, and the governor's reaping (``WORKER_JOB`` only) leaves it alone.
FETCH_JOB = "telegram-fetcher-fetch"

OVERFLOW_LABEL = "other"
#: ``commands_total{status}`` and ``deduplicated_messages_total{source}`` values.
COMMAND_STATUSES = ("ok", "partial", "retrying", "failed", "rejected", "error")
DEDUP_SOURCES = ("storage", "resume_overlap")
#: ``rate_limit_hits_total{source, reason}`` children known in advance: Telegram's flood errors
#: (``worker.tgclient``) and the shared bucket's refusals (:data:`fleet.bucket.Reason` without
#: the admitting ones) plus the gate's local pause while Redis is down.
RATE_LIMIT_HITS: tuple[tuple[str, str], ...] = (
    *(
        ("telegram", r)
        # the RPC names Telegram sends, without their number (worker.rpcerrors.rpc_reason)
        for r in ("FLOOD_WAIT", "FLOOD_PREMIUM_WAIT", "SLOWMODE_WAIT", "FLOOD_TEST_PHONE_WAIT")
    ),
    *(("bucket", r) for r in ("session", "fleet", "paused", "held", "local_pause")),
)
#: ``retries_total{target, reason}`` children known in advance: a Telegram request per class
#: (a 5xx answer is ``_TransientRpc``; a lost or slow connection) and an event publish while
#: Redis is away. ``reason`` is the error's class name, so rarer ones appear when they happen.
RETRIES: tuple[tuple[str, str], ...] = (
    *(
        (f"telegram_{c}", r)
        for c in REQUEST_CLASSES
        for r in ("_TransientRpc", "TimeoutError", "ConnectionError")
    ),
    *(("redis_publish", r) for r in ("ConnectionError", "TimeoutError")),
)
BREAKER_CLOSED, BREAKER_OPEN, BREAKER_HALF_OPEN = 0, 1, 2
_BREAKER_VALUES = {"closed": BREAKER_CLOSED, "open": BREAKER_OPEN, "half_open": BREAKER_HALF_OPEN}

#: A fetch is one command (or one day under ``per_day``): from a quiet chat's half second to an
#: hour-long backfill through flood waits.
FETCH_DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Waiting for a bucket token: sub-millisecond when the bucket is full, up to a flood pause.
TOKEN_WAIT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


def package_version() -> str:
    """The installed ``telegram-fetcher`` version (``0`` when running from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("telegram-fetcher")
    except PackageNotFoundError:
        return "0"


class LabelCap:
    """The first ``max_values`` distinct values keep their own label, later ones become
    ``other``. Thread-safe; what was admitted stays admitted for the life of the process."""

    def __init__(self, max_values: int, overflow: str = OVERFLOW_LABEL) -> None:
        self._max = max_values
        self._overflow = overflow
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = str(value)
        if text in self._seen:
            return text
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self._max:
                return self._overflow
            self._seen.add(text)
            return text

    @property
    def admitted(self) -> frozenset[str]:
        return frozenset(self._seen)


class CommonMetrics:
    """Metrics both programs export (seed 002's retry/breaker/rate-limit set, log drops)."""

    component: str

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "0") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "telegram_fetcher_build_info",
            "Always 1; the labels say what runs.",
            ["component", "version"],
            registry=r,
        )
        self.build_info.labels(component=self.component, version=version).set(1)
        self.retries_total = Counter(
            "retries_total",
            "Retries of an operation, by what was retried and why.",
            ["target", "reason"],
            registry=r,
        )
        self.rate_limit_hits_total = Counter(
            "rate_limit_hits_total",
            "Rate-limit signals met (FloodWait, slow mode, an empty bucket), by source and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.last_retry_delay_seconds = Gauge(
            "last_retry_delay_seconds",
            "Delay chosen before the latest retry, per target.",
            ["target"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
            ["component"],
            registry=r,
        )
        self.breaker_open_total = Counter(
            "breaker_open_total",
            "Transitions of the breaker into the open state.",
            ["component"],
            registry=r,
        )
        self.log_records_dropped_total = Counter(
            "log_records_dropped_total",
            "Log records not shipped (queue full while the log server was down, rejected, or "
            "lost at shutdown), per log server.",
            ["sink"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self._breaker_lock = threading.Lock()
        self._breaker_states: dict[str, int] = {}

    # -- helpers ------------------------------------------------------------------------------
    def record_retry(self, target: str, reason: str, delay_s: float) -> None:
        self.retries_total.labels(target=target, reason=reason).inc()
        self.last_retry_delay_seconds.labels(target=target).set(delay_s)

    def set_breaker_state(
        self, component: str, state: str | int, *, count_open: bool = True
    ) -> None:
        """``state``: ``closed|open|half_open`` or 0/1/2. Counts a transition into open, unless
        ``count_open=False``: a shared breaker opened by another process is only *observed*
        here, and counting it in every worker would multiply the fleet's total."""
        value = _BREAKER_VALUES[state] if isinstance(state, str) else int(state)
        with self._breaker_lock:
            previous = self._breaker_states.get(component)
            self._breaker_states[component] = value
        if count_open and value == BREAKER_OPEN and previous != BREAKER_OPEN:
            self.breaker_open_total.labels(component=component).inc()
        self.breaker_state.labels(component=component).set(value)

    def breaker_state_of(self, component: str) -> str | None:
        """The last state set for ``component`` (``closed|open|half_open``), if any."""
        value = self._breaker_states.get(component)
        names = {v: k for k, v in _BREAKER_VALUES.items()}
        return names.get(value) if value is not None else None

    def watch_log_shipper(self, shipper: LogShipper | None) -> None:
        """Count the shipper's drops in ``log_records_dropped_total{sink}``."""
        if shipper is not None:
            shipper.count_drops_in(self.log_records_dropped_total)

    def names(self) -> set[str]:
        """Every sample name this registry can export (see :func:`exported_names`)."""
        return exported_names(self.registry)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exports or will export once a label child exists:
    counters as ``x_total``, histograms as ``x_bucket/_sum/_count``, gauges as themselves."""
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names
