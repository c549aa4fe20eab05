"""Settings shared by every process of the fleet (worker and governor).

Read once from the environment and an optional ``.env`` by :func:`load_settings`, which turns a
validation error into :class:`ConfigError` whose message names the offending key. Units are in
the field names; secrets are ``SecretStr`` so that they never print.
"""

from __future__ import annotations

from typing import Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or has a wrong value; the message names the key."""


class FleetSettings(BaseSettings):
    """Keys both programs read (CONTRACT §6). Defaults are documented in ``.env.example``."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        # `KEY=` (as .env.example ships, and as Compose/supervisord pass an unset variable) means
        # "unset": the default applies, in the environment and in .env alike.
        env_ignore_empty=True,
    )

    # --- Redis -----------------------------------------------------------------------------
    redis_url: SecretStr | None = None
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_key_prefix: str = ""
    redis_max_outage_seconds: float = Field(300.0, gt=0)

    # --- identity, logs, metrics -------------------------------------------------------------
    environment: str = "development"
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    metrics_mode: Literal["scrape", "push", "both", "off"] | None = None
    metrics_port: int = Field(0, ge=0, le=65535)
    pushgateway_url: str | None = None
    pushgateway_username: str | None = None
    pushgateway_password: SecretStr | None = None
    push_interval_seconds: float = Field(15.0, gt=0)
    victoria_logs_url: str | None = None
    loki_url: str | None = None
    # Observability knobs (fleet/logs.py, fleet/metrics.py); documented in .env.example.
    log_queue_max_records: int = Field(10_000, ge=100)
    log_batch_max_records: int = Field(500, ge=1)
    log_batch_max_seconds: float = Field(1.0, gt=0)
    log_flush_timeout_seconds: float = Field(5.0, ge=0)
    metrics_host: str = "0.0.0.0"
    metrics_chat_label_max: int = Field(50, ge=1)
    metrics_session_label_max: int = Field(100, ge=1)

    # --- retries and breaker (seed 002) -------------------------------------------------------
    retry_max_attempts: int = Field(5, ge=1)
    retry_max_elapsed_seconds: float = Field(120.0, gt=0)
    backoff_base_seconds: float = Field(0.5, gt=0)
    backoff_max_seconds: float = Field(10.0, gt=0)
    circuit_breaker_window_seconds: float = Field(30.0, gt=0)
    circuit_breaker_failure_threshold: int = Field(5, ge=1)
    circuit_breaker_open_timeout_seconds: float = Field(60.0, gt=0)

    # --- rate limiting (issue 4) --------------------------------------------------------------
    rate_limit_strategy: Literal["adaptive", "fixed", "off"] = "adaptive"
    flood_wait_max_seconds: float = Field(60.0, ge=0)
    # Per account (Telegram's limits are per account): history ~30 per 30 s, so 0.9/s + 3
    # admits at most 30 in any 30 s; resolving usernames is far stricter.
    rate_history_per_second: float = Field(0.9, gt=0)
    rate_history_burst: int = Field(3, ge=1)
    rate_resolve_per_second: float = Field(0.33, gt=0)
    rate_resolve_burst: int = Field(1, ge=1)
    rate_other_per_second: float = Field(1.0, gt=0)
    rate_other_burst: int = Field(2, ge=1)
    # Fleet-wide buckets (all sessions together); the governor adapts these at runtime.
    fleet_rate_history_per_second: float = Field(10.0, gt=0)
    fleet_rate_history_burst: int = Field(1, ge=1)
    fleet_rate_resolve_per_second: float = Field(1.0, gt=0)
    # A fleet of fresh sessions resolves its chats at once (one each; every account's own
    # bucket above keeps it to its own pace): a burst of 2 started the 12th worker 11 s late.
    fleet_rate_resolve_burst: int = Field(20, ge=1)
    fleet_rate_other_per_second: float = Field(5.0, gt=0)
    fleet_rate_other_burst: int = Field(5, ge=1)
    fleet_rate_min_per_second: float = Field(0.05, gt=0)
    fleet_rate_max_per_second: float = Field(100.0, gt=0)
    # Random extra seconds on a FloodWait's N, in the worker's sleep and in the bucket's pause.
    # Small: N is already rounded up, and every flood costs the account N + this.
    flood_wait_jitter_seconds: float = Field(0.1, ge=0)
    # A FloodWait of N s also holds the whole class fleet-wide for min(N, this): 0 disables.
    flood_fleet_hold_seconds: float = Field(1.0, ge=0)
    flood_events_max: int = Field(10_000, ge=10)
    governor_tick_seconds: float = Field(1.0, gt=0)
    aimd_decrease_factor: float = Field(0.7, gt=0, lt=1)
    aimd_increase_fraction: float = Field(0.05, ge=0)
    aimd_quiet_seconds: float = Field(10.0, ge=0)
    aimd_cut_cooldown_seconds: float = Field(1.0, ge=0)
    aimd_recovery_margin: float = Field(0.97, gt=0, le=1)
    aimd_recovery_speed: float = Field(0.5, gt=0, le=1)
    circuit_breaker_probe_lease_seconds: float = Field(45.0, gt=0)
    redis_gate_timeout_seconds: float = Field(1.0, gt=0)
    redis_fallback_retry_seconds: float = Field(0.5, gt=0)

    # --- the reliable queue: read by the worker and by the governor's recovery routine -------
    worker_lease_seconds: float = Field(10.0, ge=0.5)  # heartbeat every third of it
    command_max_deliveries: int = Field(3, ge=1)  # recovered this often -> dead letter
    dead_letters_max: int = Field(10_000, ge=1)
    events_stream_maxlen: int = Field(10_000, ge=100)

    shutdown_grace_seconds: float = Field(25.0, gt=0)
    schema_version: str = "1.0.0"
    day_timezone: str = "UTC"

    @field_validator("day_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like UTC)") from exc
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> FleetSettings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("BACKOFF_MAX_SECONDS must be >= BACKOFF_BASE_SECONDS")
        if self.fleet_rate_max_per_second < self.fleet_rate_min_per_second:
            raise ValueError("FLEET_RATE_MAX_PER_SECOND must be >= FLEET_RATE_MIN_PER_SECOND")
        return self

    @property
    def effective_metrics_mode(self) -> str:
        if self.metrics_mode is not None:
            return self.metrics_mode
        return "both" if self.environment == "production" else "scrape"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.day_timezone)

    def redis_dsn(self) -> str:
        """The Redis URL with credentials; never log it (use :meth:`redis_display`)."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        auth = ""
        if self.redis_password is not None:
            user = self.redis_username or ""
            auth = f"{user}:{self.redis_password.get_secret_value()}@"
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"

    def redis_display(self) -> str:
        """The Redis address without credentials, for logs."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.redis_dsn())
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def secret_values(self) -> list[str]:
        """Every configured secret, for tests and log scrubbing."""
        out: list[str] = []
        for value in (self.redis_password, self.pushgateway_password):
            if value is not None and value.get_secret_value():
                out.append(value.get_secret_value())
        if self.redis_url is not None:
            from urllib.parse import urlsplit

            pw = urlsplit(self.redis_url.get_secret_value()).password
            if pw:
                out.append(pw)
        return out


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings, turning pydantic's report into one readable :class:`ConfigError`."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
            key = "_".join(loc).upper() if loc else "configuration"
            value = err.get("input")
            shown = "" if _looks_secret(key) or isinstance(value, dict) else f" (got {value!r})"
            problems.append(f"{key}: {err['msg']}{shown}")
        raise ConfigError("; ".join(problems)) from None


def _looks_secret(key: str) -> bool:
    return any(word in key for word in ("HASH", "PASSWORD", "PHONE", "URL", "TOKEN"))
