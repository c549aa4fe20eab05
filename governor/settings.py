"""The governor's settings: the fleet's keys plus the control loop's own."""

from __future__ import annotations

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
