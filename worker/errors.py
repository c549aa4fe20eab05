"""The worker's error tree. Third-party errors (Telethon, Redis, OS) are translated into these at
exactly one boundary each (``telegram.py``, ``queue.py``, ``storage.py``).

FetchError
├── CommandRejected        the command is invalid; never retried (dead-lettered)
├── TelegramError          anything the Telegram boundary reports
│   ├── RateLimited        FloodWait and friends; ``retry_after`` seconds
│   ├── TransientError     timeouts, RPC 5xx, connection errors; retried with backoff
│   │   ├── GapDetected    a day's end could not be proven; the day stays incomplete
│   │   └── ChatMoved      a cached username names another chat now; nothing written
│   ├── PermanentError     chat not found, private, banned; not retried
│   └── SessionRevoked     the session is unusable (auth key revoked, not logged in); fatal
├── BreakerOpen            the shared circuit breaker refuses requests for now
├── StorageError           a file could not be read or written
└── ShutdownRequested      the worker is stopping; the command goes back to the queue
"""

from __future__ import annotations


class FetchError(Exception):
    """Root of every error the worker raises on purpose."""

    retryable: bool = False

    @property
    def type_name(self) -> str:
        return type(self).__name__


class CommandRejected(FetchError):
    """The command cannot be executed as given (bad JSON, schema, impossible interval)."""


class TelegramError(FetchError):
    """An error reported by the Telegram boundary.

    ``rpc_error`` is the RPC string Telegram answered with (``USERNAME_NOT_OCCUPIED``,
    ``FLOOD_WAIT_31``), or the network condition (``TIMEOUT``), when there was one.
    """

    def __init__(self, message: str, *, rpc_error: str | None = None) -> None:
        super().__init__(message)
        self.rpc_error = rpc_error


class RateLimited(TelegramError):
    """Telegram asked us to wait ``retry_after`` seconds (FLOOD_WAIT_N and similar)."""

    retryable = True

    def __init__(
        self,
        message: str,
        retry_after: float,
        request_class: str = "other",
        rpc_error: str | None = None,
    ) -> None:
        super().__init__(message, rpc_error=rpc_error)
        self.retry_after = retry_after
        self.request_class = request_class


class TransientError(TelegramError):
    """A timeout, an RPC 5xx or a dropped connection: worth retrying later."""

    retryable = True


class GapDetected(TransientError):
    """The server contradicts a day's end (it names a message we never received) even after
    resuming: the day stays incomplete and the command is retried later."""


class PermanentError(TelegramError):
    """The chat cannot be read with this account (not found, private, banned)."""


class ChatMoved(TransientError):
    """A cached username now names another chat: nothing was written; a retry resolves the
    name afresh (and the day files' ``chat_id`` then decides whether it may be written)."""


class SessionRevoked(TelegramError):
    """The Telegram session cannot be used any more (revoked key, not logged in)."""


class BreakerOpen(FetchError):
    """The fleet's circuit breaker is open; no request may be sent for now."""

    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageError(FetchError):
    """A data file or the progress file could not be read or written."""


class ShutdownRequested(FetchError):
    """The worker is stopping; what was not finished goes back to the queue."""

    retryable = True
