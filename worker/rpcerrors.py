"""The one place Telethon's errors become ``worker.errors`` types.

=============================================================  ===================================
Telethon                                                       worker
=============================================================  ===================================
``FloodWaitError``/``FloodPremiumWaitError`` (N <= cap)        slept out by the gated client
                                                               (:mod:`worker.tgclient`)
the same with N > ``FLOOD_WAIT_MAX_SECONDS``                   ``RateLimited(retry_after=N)``
RPC 5xx, ``TimedOutError``, timeouts, ``OSError``               retried with backoff, then
                                                               ``TransientError``
``AuthKeyError``, ``UnauthorizedError`` (revoked, deactivated)  ``SessionRevoked``
``ChannelPrivateError``, ``UsernameNotOccupiedError``, other    ``PermanentError``
4xx, unknown chats
=============================================================  ===================================

Every translated error names the RPC string Telegram sent (``USERNAME_NOT_OCCUPIED: …``, kept as
``rpc_error``): Telethon's known error classes carry only their base class's generic text in
``.message`` (``BAD_REQUEST``, ``FLOOD``), so :func:`rpc_string` recovers the name from the
tables Telethon built the classes from, and :func:`rpc_reason` drops the number for metrics
labels (``FLOOD_WAIT_31`` → ``FLOOD_WAIT``).
"""

from __future__ import annotations

import re

from telethon import errors
from telethon.errors import rpcerrorlist

from fleet.gate import RequestClass
from worker.errors import (
    PermanentError,
    RateLimited,
    SessionRevoked,
    TelegramError,
    TransientError,
)

SERVER_SIDE = (errors.ServerError, errors.TimedOutError)
FLOOD = (
    errors.FloodWaitError,
    errors.FloodPremiumWaitError,
    errors.SlowModeWaitError,
    errors.FloodTestPhoneWaitError,
)


class _TransientRpc(Exception):
    """A 5xx-class RPC error, carried past Telethon's ``_call`` so that it does not sleep 2 s.

    The class name is a ``retries_total`` reason label (see :mod:`fleet.metrics`): keep it."""

    def __init__(self, error: errors.RPCError) -> None:
        super().__init__(str(error))
        self.error = error


# OSError covers TimeoutError (our wait_for) and ConnectionError (MTProtoSender).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (_TransientRpc, OSError)


def is_server_side(exc: errors.RPCError) -> bool:
    """A 5xx-class answer (or Telethon's negative codes): worth retrying."""
    code = exc.code or 0
    return isinstance(exc, SERVER_SIDE) or code >= 500 or code < 0


# Telethon's known error classes keep only their base class's generic text in ``.message``
# (``USERNAME_NOT_OCCUPIED`` says ``BAD_REQUEST``, ``FLOOD_WAIT_31`` says ``FLOOD``): the RPC
# string is recovered from the tables Telethon built the class from.
_NAME_OF: dict[type[BaseException], str] = {}
for _name, _cls in rpcerrorlist.rpc_errors_dict.items():
    _NAME_OF.setdefault(_cls, _name)
_PATTERN_OF: dict[type[BaseException], str] = {
    _cls: _pattern for _pattern, _cls in rpcerrorlist.rpc_errors_re
}
_CAPTURE = re.compile(r"\(\\d\+\)")

#: The refusals a user can act on, with what to tell them (checked in this order).
_PERMANENT: dict[type[BaseException], str] = {
    errors.ChannelPrivateError: "the chat is private or this account was banned from it",
    errors.UsernameNotOccupiedError: "no chat has this username",
    errors.UsernameInvalidError: "the username is invalid",
    errors.ChannelInvalidError: "no chat with this id is known to this account",
    errors.PeerIdInvalidError: "no chat with this id is known to this account",
    errors.ChatForbiddenError: "this account may not read the chat",
    errors.ChannelBannedError: "this account may not read the chat",
    errors.PhoneNumberUnoccupiedError: "no Telegram account uses this phone number",
    errors.PhoneNumberInvalidError: "not a valid phone number",
    errors.PhoneNumberBannedError: "this phone number is banned from Telegram",
    errors.PhoneCodeInvalidError: "the login code was wrong",
    errors.PhoneCodeExpiredError: "the login code expired; ask for a new one",
    errors.PasswordHashInvalidError: "the two-step verification password was wrong",
}


def _capture(exc: BaseException) -> int | None:
    """The number a pattern error (``FLOOD_WAIT_31``) was made with; Telethon names its
    attribute per class (``seconds``, ``new_dc``, ``which``…), so take the one int it set."""
    for key, value in vars(exc).items():
        if key != "code" and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def rpc_string(exc: BaseException) -> str:
    """The RPC error as Telegram sent it (``FLOOD_WAIT_31``, ``USERNAME_NOT_OCCUPIED``)."""
    name = _NAME_OF.get(type(exc))
    if name is not None:
        return name
    pattern = _PATTERN_OF.get(type(exc))
    if pattern is not None:
        number = _capture(exc)
        return _CAPTURE.sub(str(number) if number is not None else "N", pattern)
    return getattr(exc, "message", None) or type(exc).__name__


def rpc_reason(exc: BaseException) -> str:
    """The RPC error without its number (``FLOOD_WAIT``): a bounded metrics label."""
    pattern = _PATTERN_OF.get(type(exc))
    if pattern is not None:
        return _CAPTURE.sub("", pattern).replace("__", "_").strip("_")
    return re.sub(r"_?\d+$", "", rpc_string(exc)) or rpc_string(exc)


def translate(exc: BaseException, request_class: RequestClass = "other") -> TelegramError:
    """The ``worker.errors`` form of an error raised by Telethon (or the network under it).

    Every message starts with the RPC string Telegram sent (``USERNAME_NOT_OCCUPIED: …``) and
    the error keeps it as ``rpc_error``, so logs, events and metrics name the real error.
    """
    if isinstance(exc, TelegramError):
        return exc
    if isinstance(exc, _TransientRpc):
        exc = exc.error
    if not isinstance(exc, errors.RPCError):
        return _translate_local(exc, request_class)
    return _translate_rpc(exc, request_class)


def _translate_local(exc: BaseException, request_class: RequestClass) -> TelegramError:
    """An error raised on our side of the wire: the network, a timeout, a bad lookup."""
    if isinstance(exc, TimeoutError):
        return TransientError(f"{request_class} request timed out", rpc_error="TIMEOUT")
    if isinstance(exc, EOFError):  # asyncio.IncompleteReadError: closed mid-answer
        return TransientError(
            f"the server closed the connection on {request_class}", rpc_error="CONNECTION_CLOSED"
        )
    if isinstance(exc, OSError):
        return TransientError(
            f"connection problem on {request_class}: {type(exc).__name__}",
            rpc_error=type(exc).__name__,
        )
    if isinstance(exc, ValueError):
        return PermanentError(f"chat not found: {exc}")
    return TransientError(f"unexpected {type(exc).__name__} on {request_class}")


def _translate_rpc(exc: errors.RPCError, request_class: RequestClass) -> TelegramError:
    """An answer from Telegram: named by its RPC string, classed by what a retry can do."""
    name = rpc_string(exc)

    def said(text: str) -> str:
        return f"{name}: {text}"

    if isinstance(exc, FLOOD):
        seconds = float(getattr(exc, "seconds", 0) or 0)
        return RateLimited(
            said(f"Telegram asks to wait {seconds:.0f}s before the next {request_class} request"),
            retry_after=seconds,
            request_class=request_class,
            rpc_error=name,
        )
    if isinstance(exc, errors.FloodError):  # 420 without a number (e.g. FROZEN_METHOD_INVALID)
        return RateLimited(said(f"rate limited on {request_class}"), 60.0, request_class, name)
    if isinstance(exc, errors.AuthKeyError | errors.UnauthorizedError):
        return SessionRevoked(
            said(
                "the Telegram session is no longer valid; log in again with "
                "`python -m worker login --session NAME`"
            ),
            rpc_error=name,
        )
    for cls, text in _PERMANENT.items():
        if isinstance(exc, cls):
            return PermanentError(said(text), rpc_error=name)
    if is_server_side(exc):
        return TransientError(said(f"Telegram server error on {request_class}"), rpc_error=name)
    return PermanentError(said("Telegram refused the request"), rpc_error=name)
