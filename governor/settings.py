"""The governor's settings: the fleet's keys plus the control loop's own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fleet.settings import FleetSettings


class GovernorSettings(FleetSettings):
    """What ``python -m governor`` reads on top of the fleet's keys (documented in .env.example).

    The queue keys it shares with the worker (``WORKER_LEASE_SECONDS``,
    ``COMMAND_MAX_DELIVERIES``, …) are declared once, in :class:`fleet.settings.FleetSettings`.
    """

    governor_id: str | None = None  # default: <host>-<pid>
    governor_lease_seconds: float = Field(5.0, gt=0)
    governor_pushgateway_reap_seconds: float = Field(60.0, gt=0)
    schedule_chats: str = ""
    schedule_daily_at: str = "01:00"

    # --- incremental scheduler (issue 14, seed 003's names) -----------------------------------
    feature_incremental_parsing_enabled: bool = False
    parser_scheduler_interval_sec: float = Field(300.0, ge=1)
    parser_max_concurrency: int = Field(4, ge=1)  # scheduler commands in flight at once
    parser_mode_override: Literal["auto", "historical", "incremental"] = "auto"
    parser_retry_max: int = Field(3, ge=0)
    parser_default_backfill_days: int = Field(7, ge=0, le=3660)
    parser_full_backfill_days: int = Field(365, ge=1, le=3660)
    parser_channels_file: Path | None = None  # channels.yaml, added at the leader's start
    # per_day: a backfill can be split over the fleet by workers with FETCH_SPLIT_PER_DAY
    parser_historical_strategy: Literal["batch", "per_day"] = "batch"
    # --- end of the incremental scheduler's keys ----------------------------------------------

    # --- rate learning (issue 10: each account's limit and the fleet's, learned apart) ---
    # A bucket that never flooded grows × this per tick while saturated (configured rates are
    # only a first guess; 1 = additive AIMD steps only).
    governor_slow_start_factor: float = Field(1.25, ge=1.0, le=4.0)
    # Above the rate of its last shared flood, a saturated fleet bucket probes after this long
    # without one… (a session's own bucket: after 3 x AIMD_QUIET_SECONDS)
    governor_probe_quiet_seconds: float = Field(5.0, ge=0)
    # …growing x this per tick (1 = AIMD_INCREASE_FRACTION steps only).
    governor_probe_factor: float = Field(1.1, ge=1.0, le=2.0)

    @field_validator("schedule_daily_at")
    @classmethod
    def _hh_mm(cls, value: str) -> str:
        from governor.scheduler import parse_daily_at

        parse_daily_at(value)
        return value.strip()

    @field_validator("schedule_chats")
    @classmethod
    def _chats(cls, value: str) -> str:
        from governor.scheduler import parse_chats

        return ",".join(parse_chats(value))

    @model_validator(mode="after")
    def _lease_outlives_tick(self) -> GovernorSettings:
        if self.governor_lease_seconds < 2 * self.governor_tick_seconds:
            raise ValueError("GOVERNOR_LEASE_SECONDS must be at least 2 × GOVERNOR_TICK_SECONDS")
        return self

    def resolved_governor_id(self) -> str:
        if self.governor_id:
            return self.governor_id
        import os
        import socket

        return f"{socket.gethostname().split('.')[0] or 'governor'}-{os.getpid()}"
