"""The leader's sampled gauges: bucket tokens and pauses, split commands, scheduled channels.

Each sample scans keys (the bucket and pause keys, the split records, every channel), so each
is taken at most every ``GAUGE_SAMPLE_S`` rather than on every tick.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from redis.asyncio import Redis

from fleet.bucket import TokenBucket
from fleet.gate import REQUEST_CLASSES
from fleet.keys import Keys, check_session
from governor.settings import GovernorSettings

GAUGE_SAMPLE_S = 5.0  # how often the leader samples bucket tokens and pauses for its gauges


class GaugeSampler:
    """Samples for :class:`governor.metrics.GovernorMetrics` (nothing when metrics is None)."""

    def __init__(self, metrics: Any, redis: Redis, keys: Keys, settings: GovernorSettings) -> None:
        self.metrics = metrics
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._last_bucket = -math.inf
        self._last_sched = -math.inf
        self._last_split = -math.inf

    async def bucket(self, bucket: TokenBucket) -> None:
        """``bucket_tokens`` and ``pauses_in_force`` from a bucket snapshot, at most every
        ``GAUGE_SAMPLE_S`` (the snapshot scans the bucket and pause keys)."""
        if self.metrics is None or time.monotonic() - self._last_bucket < GAUGE_SAMPLE_S:
            return
        self._last_bucket = time.monotonic()
        snap = await bucket.snapshot()
        for c in REQUEST_CLASSES:
            fleet = snap["rates"]["fleet"][c]
            tokens = snap["tokens"].get(f"fleet:{c}", float(fleet["burst"]))  # idle: full
            self.metrics.bucket_tokens.labels(request_class=c).set(tokens)
            self.metrics.bucket_rate_per_second.labels(request_class=c).set(fleet["per_second"])
            paused = sum(1 for name in snap["pauses_s"] if name.endswith(f":{c}"))
            self.metrics.pauses_in_force.labels(request_class=c).set(paused)
        await self._sessions()

    async def _sessions(self) -> None:
        """Every session a registered worker holds (its heartbeat's ``session``) gets its
        ``flood_waits_total`` children at 0 before its first FloodWait."""
        for raw in await self.redis.hvals(self.keys.workers):
            try:
                session = json.loads(raw).get("session")
                if isinstance(session, str):
                    self.metrics.know_session(check_session(session))
            except (ValueError, AttributeError):
                continue  # not a heartbeat this version wrote: nothing to label

    async def splits(self) -> None:
        """``split_commands_in_flight`` and ``split_parts{state}``, at most every
        ``GAUGE_SAMPLE_S`` (worker/parts.py)."""
        if self.metrics is None:
            return
        now = time.monotonic()
        if now - self._last_split < GAUGE_SAMPLE_S:
            return
        self._last_split = now
        from governor.incremental import split_counts

        parents, pending, running = await split_counts(self.redis, self.keys)
        self.metrics.split_commands_in_flight.set(parents)
        self.metrics.split_parts.labels(state="running").set(running)
        self.metrics.split_parts.labels(state="queued").set(max(0, pending - running))

    async def channels(self) -> None:
        """Channels by mode and per-channel lag, at most every ``GAUGE_SAMPLE_S``."""
        if self.metrics is None or time.monotonic() - self._last_sched < GAUGE_SAMPLE_S:
            return
        self._last_sched = time.monotonic()
        from governor.incremental import channel_report

        m = self.metrics
        report = await channel_report(self.redis, self.keys, self.settings)
        by_mode = {"historical": 0, "incremental": 0, "paused": 0}
        for r in report:
            by_mode[r["mode"]] = by_mode.get(r["mode"], 0) + 1
            if r["lag_s"] is not None:
                m.scheduler_channel_lag_seconds.labels(chat=m.chat_label(r["chat"])).set(r["lag_s"])
        for mode, n in by_mode.items():
            m.scheduler_channels.labels(mode=mode).set(n)
