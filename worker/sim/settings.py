"""The simulator's settings (``SIM_*``, read only when ``TELEGRAM_BACKEND=sim``).

They extend the worker's, because a simulated client is a real gated client (timeouts, retries)
above a fake server; the production code never reads them: :mod:`worker.backend` builds them and
injects the simulator as a client factory.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pydantic import Field, field_validator

from worker.settings import WorkerSettings

KNOWN_FAULTS = frozenset(
    {
        "timeout",
        "rpc500",
        "auth_key_unregistered",
        "channel_private",
        "flood_wait",
        "username_not_occupied",
    }
)


class SimSettings(WorkerSettings):
    """The worker's keys plus the simulated world's (documented in ``.env.example``)."""

    sim_sessions: str = ""  # virtual session names, comma-separated
    sim_seed: int = 0
    sim_messages_per_day: int = Field(200, ge=0, le=400_000)
    sim_empty_day_ratio: float = Field(0.1, ge=0, le=1)
    sim_history_start: str = "2024-01-01"
    sim_history_requests: int = Field(30, ge=0)
    sim_history_window_seconds: float = Field(30.0, gt=0)
    sim_resolve_requests: int = Field(20, ge=0)
    sim_resolve_window_seconds: float = Field(60.0, gt=0)
    sim_fleet_requests: int = Field(0, ge=0)
    sim_fleet_window_seconds: float = Field(1.0, gt=0)
    sim_latency_ms: float = Field(0.0, ge=0)
    sim_fault_rate: float = Field(0.0, ge=0, le=1)
    sim_faults: str = "timeout,rpc500"
    sim_request_log: Path | None = None
    #: A server that stops answering: requests after the first N are never answered (-1: off;
    #: 0: not even the authorisation check at connect).
    sim_hang_after_requests: int = Field(-1, ge=-1)
    #: Reverse pages reaching past the newest message are shifted (newer plus older messages)
    #: instead of cut, as some MTProto servers do.
    sim_shifted_window: bool = False
    #: ``offset_date`` is ignored (counted from the newest message), as some servers do.
    sim_ignore_offset_date: bool = False
    #: Every Nth getHistory deletes a message of the day it pages through (0: never), so
    #: messages vanish while a day is being fetched.
    sim_delete_every_history_requests: int = Field(0, ge=0)
    #: Usernames (comma-separated) that now belong to another chat than the one they named.
    sim_moved_usernames: str = ""
    sim_horizon_file: Path | None = None  # runtime append (issue 14): see world.Horizon

    @field_validator("sim_faults")
    @classmethod
    def _known_faults(cls, value: str) -> str:
        names = {v.strip() for v in value.split(",") if v.strip()}
        unknown = names - KNOWN_FAULTS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(KNOWN_FAULTS)}")
        return ",".join(sorted(names))

    @field_validator("sim_history_start")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        date.fromisoformat(value)
        return value

    def session_names(self) -> list[str]:
        return [n.strip() for n in self.sim_sessions.split(",") if n.strip()]
