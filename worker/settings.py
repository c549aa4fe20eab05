"""The worker's settings: the fleet-wide keys plus Telegram, storage and commands.

One :class:`WorkerSettings` is built in ``cli.py`` and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from fleet.settings import FleetSettings


class WorkerSettings(FleetSettings):
    # --- Telegram ----------------------------------------------------------------------------
    telegram_api_id: int | None = None
    telegram_api_hash: SecretStr | None = None
    telegram_phone: SecretStr | None = None
    telegram_backend: Literal["telethon", "sim"] = "telethon"
    telegram_session: str | None = None
    telegram_request_timeout_seconds: float = Field(30.0, gt=0)
    sessions_dir: Path = Path("sessions")

    # --- worker identity and concurrency -------------------------------------------------------
    worker_id: str | None = None
    parallelism_max: int = Field(2, ge=1, le=16)
    fetch_concurrency: int = Field(1, ge=1, le=8)
    fetch_strategy: Literal["batch", "per_day"] = "batch"
    # issue 14: split per_day commands over several days into per-day parts any worker may take
    fetch_split_per_day: bool = False
    fetch_mode: Literal["yesterday", "full"] = "yesterday"

    # --- storage ------------------------------------------------------------------------------
    data_dir: Path = Path("data")
    storage_lock_timeout_seconds: float = Field(30.0, gt=0)
    progress_checkpoint_seconds: float = Field(5.0, ge=0)

    # --- commands -----------------------------------------------------------------------------
    max_range_days: int = Field(366, ge=1)
    max_command_bytes: int = Field(65536, ge=256)
    command_pop_timeout_seconds: float = Field(1.0, gt=0)
    health_file: Path = Path("/tmp/.fetcher_healthy")

    # --- daemon: reliable queue, events, sessions, health (issue 3) ---------------------------
    recovery_interval_seconds: float = Field(1.0, gt=0)  # requeue dead workers' commands
    command_retry_max: int = Field(3, ge=0)  # retryable failures before giving up
    command_retry_base_seconds: float = Field(5.0, ge=0)  # delay before the 1st retry
    command_retry_max_seconds: float = Field(300.0, ge=0)  # cap of the doubling delay
    completed_ids_ttl_seconds: float = Field(7 * 86400.0, gt=0)  # idempotency window
    dead_letter_payload_max_bytes: int = Field(1 << 20, ge=1024)
    event_publish_max_seconds: float = Field(30.0, ge=0)
    progress_event_interval_seconds: float = Field(2.0, ge=0)
    session_lease_seconds: float = Field(30.0, ge=1)
    session_wait_seconds: float = Field(5.0, gt=0)  # poll interval when no session is free
    health_max_age_seconds: float = Field(30.0, gt=0)  # `check` fails when older

    @field_validator("fetch_strategy", mode="before")
    @classmethod
    def _legacy_strategy(cls, value: object) -> object:
        return {"auto": "batch", "sequential": "per_day"}.get(str(value), value)

    @field_validator("telegram_session")
    @classmethod
    def _session_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("session names are 1-64 characters of [A-Za-z0-9_.-]")
        return value

    def resolved_worker_id(self, session: str | None = None) -> str:
        if self.worker_id:
            return self.worker_id
        host = socket.gethostname().split(".")[0] or "worker"
        return f"{host}-{session}" if session else host

    def secret_values(self) -> list[str]:
        out = super().secret_values()
        for value in (self.telegram_api_hash, self.telegram_phone):
            if value is not None and value.get_secret_value():
                out.append(value.get_secret_value())
        return out
