"""The governor's metrics: the shared bucket, flood waits, pauses and the fleet.

The label caps, exporters and Pushgateway handling are in :mod:`fleet.metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet.gate import REQUEST_CLASSES
from fleet.metrics import CommonMetrics, LabelCap


class GovernorMetrics(CommonMetrics):
    """The governor's registry: the shared bucket, flood waits, pauses, the fleet."""

    component = "governor"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "0",
        session_label_max: int = 100,
        chat_label_max: int = 50,
    ) -> None:
        super().__init__(registry, version=version)
        self.session_label = LabelCap(session_label_max)
        self.chat_label = LabelCap(chat_label_max)
        # Registered in this order, which is the order of the exposition.
        self._bucket_metrics(self.registry)
        self._fleet_metrics(self.registry)
        self._scheduler_metrics(self.registry)
        self._known_children()

    def _bucket_metrics(self, r: CollectorRegistry) -> None:
        """The shared token bucket, the flood waits workers report, the pauses they cause."""
        self.bucket_rate_per_second = Gauge(
            "bucket_rate_per_second",
            "Rate the shared token bucket admits, per request class.",
            ["request_class"],
            registry=r,
        )
        self.bucket_tokens = Gauge(
            "bucket_tokens",
            "Tokens currently in the shared bucket, per request class.",
            ["request_class"],
            registry=r,
        )
        self.flood_waits_total = Counter(
            "flood_waits_total",
            "FloodWait errors reported by workers, by session and class.",
            ["session", "request_class"],
            registry=r,
        )
        self.flood_wait_seconds_total = Counter(
            "flood_wait_seconds_total",
            "Seconds of FloodWait imposed by Telegram, per class.",
            ["request_class"],
            registry=r,
        )
        self.pauses_in_force = Gauge(
            "pauses_in_force",
            "Flood-wait pauses currently in force, per request class.",
            ["request_class"],
            registry=r,
        )

    def _fleet_metrics(self, r: CollectorRegistry) -> None:
        """The workers as the leader sees them: alive, dead-lettered, recovered, its lease."""
        self.live_workers = Gauge(
            "live_workers",
            "Workers whose heartbeat is current.",
            registry=r,
        )
        self.dead_letters = Gauge(
            "dead_letters",
            "Commands in the dead-letter list.",
            registry=r,
        )
        self.commands_recovered_total = Counter(
            "commands_recovered_total",
            "Commands put back on the queue after a worker died.",
            registry=r,
        )
        self.governor_leader = Gauge(
            "governor_leader",
            "1 while this governor holds the leader lease.",
            registry=r,
        )
        self.pushgateway_groups_deleted_total = Counter(
            "pushgateway_groups_deleted_total",
            "Pushgateway groups of dead workers deleted by the governor.",
            registry=r,
        )

    def _scheduler_metrics(self, r: CollectorRegistry) -> None:
        """The incremental scheduler and split commands (issue 14)."""
        self.scheduler_ticks_total = Counter(
            "scheduler_ticks_total",
            "Evaluations of the incremental scheduler that swept or pushed commands.",
            registry=r,
        )
        self.scheduler_commands_total = Counter(
            "scheduler_commands_total",
            "Fetch commands the incremental scheduler pushed, by mode.",
            ["mode"],
            registry=r,
        )
        self.scheduler_in_flight = Gauge(
            "scheduler_in_flight",
            "Scheduler commands queued, delayed or running (at most PARSER_MAX_CONCURRENCY).",
            registry=r,
        )
        self.scheduler_channels = Gauge(
            "scheduler_channels",
            "Active channels by the mode of their next run (historical, incremental, paused).",
            ["mode"],
            registry=r,
        )
        self.scheduler_channel_lag_seconds = Gauge(
            "scheduler_channel_lag_seconds",
            "Seconds since a channel's last successful scheduled run ended (chat label capped).",
            ["chat"],
            registry=r,
        )
        self.split_commands_in_flight = Gauge(
            "split_commands_in_flight",
            "Commands split into per-day parts whose parts are not all over.",
            registry=r,
        )
        self.split_parts = Gauge(
            "split_parts",
            "Per-day parts not over yet, by state (queued: waiting or delayed; running: held).",
            ["state"],
            registry=r,
        )

    def _known_children(self) -> None:
        """Label children known in advance, so their panels show 0 rather than no data."""
        for mode in ("historical", "incremental"):
            self.scheduler_commands_total.labels(mode=mode)
        for state in ("queued", "running"):
            self.split_parts.labels(state=state)
        for request_class in REQUEST_CLASSES:
            self.bucket_rate_per_second.labels(request_class=request_class)
            self.bucket_tokens.labels(request_class=request_class)
            self.pauses_in_force.labels(request_class=request_class)
            self.flood_wait_seconds_total.labels(request_class=request_class)

    def know_session(self, session: str) -> None:
        """A session a worker holds: its ``flood_waits_total`` children start at 0, so the flood
        panels and ``rate()`` see "none yet" rather than no series (issue 12). The label cap
        applies as for a flood (the same sessions are the ones that would flood)."""
        label = self.session_label(session)
        for request_class in REQUEST_CLASSES:
            self.flood_waits_total.labels(session=label, request_class=request_class)

    def count_flood_wait(self, session: str, request_class: str, seconds: float) -> None:
        self.flood_waits_total.labels(
            session=self.session_label(session), request_class=request_class
        ).inc()
        self.flood_wait_seconds_total.labels(request_class=request_class).inc(max(0.0, seconds))
