"""The worker's metrics: fetch, queue and request-gate series on top of the fleet's common ones.

The label caps, exporters and Pushgateway handling are in :mod:`fleet.metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet.gate import REQUEST_CLASSES
from fleet.metrics import (
    COMMAND_STATUSES,
    DEDUP_SOURCES,
    FETCH_DURATION_BUCKETS,
    RATE_LIMIT_HITS,
    RETRIES,
    TOKEN_WAIT_BUCKETS,
    CommonMetrics,
    LabelCap,
)

#: ``fetch_errors_total{type}`` children known in advance: the ``type_name`` of every
#: :mod:`worker.errors` class the code raises and counts (not ``CommandRejected``, counted as
#: ``commands_total{status="rejected"}``, nor ``ShutdownRequested``, an interruption), the plain
#: ``FetchError`` a part's internal error is wrapped in, and a split command's ``PartFailed``.
#: An unexpected exception is counted under its own class name when it happens.
FETCH_ERROR_TYPES = (
    "RateLimited",
    "TransientError",
    "GapDetected",
    "ChatMoved",
    "PermanentError",
    "SessionRevoked",
    "BreakerOpen",
    "StorageError",
    "FetchError",
    "PartFailed",
)
#: ``last_retry_delay_seconds{target}`` children known in advance: the targets of ``RETRIES``.
RETRY_TARGETS = tuple(dict.fromkeys(target for target, _ in RETRIES))


class WorkerMetrics(CommonMetrics):
    """The worker's registry: fetch, queue and request-gate metrics (seeds 002 and 004)."""

    component = "worker"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "0",
        chat_label_max: int = 50,
    ) -> None:
        super().__init__(registry, version=version)
        self.chat_label = LabelCap(chat_label_max)
        # Families register in this order (fetch, queue, gate) so the exposition keeps its order.
        self._add_fetch_families(self.registry)
        self._add_queue_families(self.registry)
        self._add_gate_families(self.registry)
        self._zero_known_labels()

    def _add_fetch_families(self, r: CollectorRegistry) -> None:
        self.fetch_duration_seconds = Histogram(
            "fetch_duration_seconds",
            "Wall time of one fetch (a command, or a day per_day).",
            ["chat"],
            buckets=FETCH_DURATION_BUCKETS,
            registry=r,
        )
        self.fetch_lag_seconds = Gauge(
            "fetch_lag_seconds",
            "Now minus the date of the newest message stored for the chat.",
            ["chat"],
            registry=r,
        )
        self.deduplicated_messages_total = Counter(
            "deduplicated_messages_total",
            "Messages dropped as duplicates before writing.",
            ["source"],
            registry=r,
        )
        self.messages_fetched_total = Counter(
            "messages_fetched_total",
            "Messages fetched from Telegram and stored.",
            registry=r,
        )
        self.fetch_errors_total = Counter(
            "fetch_errors_total",
            "Fetches that ended in an error, by error class.",
            ["type"],
            registry=r,
        )

    def _add_queue_families(self, r: CollectorRegistry) -> None:
        self.command_queue_length = Gauge(
            "command_queue_length",
            "Commands waiting in tg_commands (as last seen).",
            registry=r,
        )
        self.commands_total = Counter(
            "commands_total",
            "Command executions finished, by status: ok, partial, retrying (failed, retry "
            "scheduled), failed, rejected (invalid), error (internal error).",
            ["status"],
            registry=r,
        )

    def _add_gate_families(self, r: CollectorRegistry) -> None:
        self.token_wait_seconds = Histogram(
            "token_wait_seconds",
            "Time a request waited for a token of the shared bucket, per request class.",
            ["request_class"],
            buckets=TOKEN_WAIT_BUCKETS,
            registry=r,
        )

    def _zero_known_labels(self) -> None:
        """Known label values start at 0, so rate() and increase() see the first event."""
        for request_class in REQUEST_CLASSES:
            self.token_wait_seconds.labels(request_class=request_class)
        for status in COMMAND_STATUSES:
            self.commands_total.labels(status=status)
        for source in DEDUP_SOURCES:
            self.deduplicated_messages_total.labels(source=source)
        for target, reason in RETRIES:
            self.retries_total.labels(target=target, reason=reason)
        for source, reason in RATE_LIMIT_HITS:
            self.rate_limit_hits_total.labels(source=source, reason=reason)
        self.breaker_open_total.labels(component="telegram")
        self._errors_and_delays_at_zero()

    def _errors_and_delays_at_zero(self) -> None:
        """Issue 12: the error and retry-delay panels show 0, not "no data", until the first
        error or retry (the delay gauge reads 0 until a retry sets it)."""
        for error_type in FETCH_ERROR_TYPES:
            self.fetch_errors_total.labels(type=error_type)
        for target in RETRY_TARGETS:
            self.last_retry_delay_seconds.labels(target=target)

    def observe_fetch(self, chat: str, seconds: float) -> None:
        self.fetch_duration_seconds.labels(chat=self.chat_label(chat)).observe(seconds)

    def set_fetch_lag(self, chat: str, seconds: float) -> None:
        self.fetch_lag_seconds.labels(chat=self.chat_label(chat)).set(seconds)
