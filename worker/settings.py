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

DC_PATTERN = re.compile(
    r"(?P<id>[1-9][0-9]{0,2})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s\[\]]+):(?P<port>[0-9]{1,5})"
)
#: Telegram's test environment, DC 2 (https://core.telegram.org/api/auth#test-accounts).
TEST_DC = (2, "149.154.167.40", 443)


class WorkerSettings(FleetSettings):
    # --- Telegram ----------------------------------------------------------------------------
    telegram_api_id: int | None = None
    telegram_api_hash: SecretStr | None = None
    telegram_phone: SecretStr | None = None
    telegram_backend: Literal["telethon", "sim"] = "telethon"
    telegram_session: str | None = None
    telegram_request_timeout_seconds: float = Field(30.0, gt=0)
    #: Bound on connect + the authorisation check (0: TELEGRAM_REQUEST_TIMEOUT_SECONDS).
    telegram_connect_timeout_seconds: float = Field(0.0, ge=0)
    #: ``ID@HOST:PORT`` of the MTProto endpoint to use instead of Telegram's production DC.
    telegram_dc: str | None = None
    #: PEM (PKCS#1) file of the endpoint's RSA public key, when Telethon does not know it.
    telegram_dc_public_key_file: Path | None = None
    #: Telegram's test environment (DC 2 of the test servers unless TELEGRAM_DC says otherwise).
    telegram_test_servers: bool = False
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

    @field_validator("telegram_dc", mode="before")
    @classmethod
    def _dc(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        text = str(value).strip()
        if not DC_PATTERN.fullmatch(text):
            raise ValueError(
                f"{text!r} is not ID@HOST:PORT (e.g. 2@149.154.167.40:443 or 1@[::1]:4430)"
            )
        return text

    @field_validator("telegram_dc_public_key_file")
    @classmethod
    def _key_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @property
    def connect_timeout_s(self) -> float:
        return self.telegram_connect_timeout_seconds or self.telegram_request_timeout_seconds

    def telegram_endpoint(self) -> tuple[int, str, int] | None:
        """``(dc_id, host, port)`` the client must use, ``None`` for Telethon's default."""
        if self.telegram_dc is not None:
            match = DC_PATTERN.fullmatch(self.telegram_dc)
            assert match is not None  # checked by the validator
            return int(match["id"]), match["host"].strip("[]"), int(match["port"])
        if self.telegram_test_servers:
            return TEST_DC
        return None

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
