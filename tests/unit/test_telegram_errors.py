"""Telegram's error names survive translation: the RPC string, never the base class's text.

The errors are the ones Telethon itself builds from an ``rpc_error`` answer
(``rpc_message_to_error``), exactly what a real server's reply turns into.
"""

from __future__ import annotations

import pytest
from telethon import errors
from telethon.tl import types

from worker.errors import PermanentError, RateLimited, SessionRevoked, TransientError
from worker.login import login_error
from worker.rpcerrors import rpc_reason, rpc_string, translate


def rpc(code: int, message: str) -> errors.RPCError:
    return errors.rpc_message_to_error(types.RpcError(code, message), None)


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (420, "FLOOD_WAIT_31", "FLOOD_WAIT"),
        (420, "FLOOD_PREMIUM_WAIT_5", "FLOOD_PREMIUM_WAIT"),
        (400, "USERNAME_NOT_OCCUPIED", "USERNAME_NOT_OCCUPIED"),
        (401, "AUTH_KEY_UNREGISTERED", "AUTH_KEY_UNREGISTERED"),
        (400, "PHONE_NUMBER_UNOCCUPIED", "PHONE_NUMBER_UNOCCUPIED"),
        (500, "INTERNAL", "INTERNAL"),
        (400, "A_NAME_TELETHON_DOES_NOT_KNOW", "A_NAME_TELETHON_DOES_NOT_KNOW"),
        (303, "FILE_MIGRATE_2", "FILE_MIGRATE"),
    ],
)
def test_the_rpc_string_is_recovered_from_telethons_error_class(
    code: int, message: str, reason: str
) -> None:
    exc = rpc(code, message)
    assert rpc_string(exc) == message
    assert rpc_reason(exc) == reason


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (420, "FLOOD_WAIT_31", RateLimited),
        (400, "USERNAME_NOT_OCCUPIED", PermanentError),
        (400, "CHANNEL_PRIVATE", PermanentError),
        (401, "AUTH_KEY_UNREGISTERED", SessionRevoked),
        (500, "INTERNAL", TransientError),
        (400, "A_NAME_TELETHON_DOES_NOT_KNOW", PermanentError),
    ],
)
def test_translated_errors_say_the_rpc_name_and_keep_it(
    code: int, message: str, kind: type[Exception]
) -> None:
    error = translate(rpc(code, message), "history")
    assert isinstance(error, kind)
    assert str(error).startswith(f"{message}: ")
    assert error.rpc_error == message
    for generic in ("BAD_REQUEST", "UNAUTHORIZED", "FLOOD:"):
        assert generic not in str(error)


def test_flood_wait_keeps_its_seconds() -> None:
    error = translate(rpc(420, "FLOOD_WAIT_31"), "resolve")
    assert isinstance(error, RateLimited)
    assert error.retry_after == 31
    assert error.request_class == "resolve"


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("PHONE_NUMBER_UNOCCUPIED", "no Telegram account uses this phone number"),
        ("PHONE_CODE_INVALID", "the login code was wrong"),
        ("PHONE_CODE_EXPIRED", "the login code expired"),
        ("PASSWORD_HASH_INVALID", "the two-step verification password was wrong"),
        ("PHONE_NUMBER_BANNED", "banned"),
    ],
)
def test_each_login_refusal_has_its_own_message(message: str, says: str) -> None:
    error = login_error(rpc(400, message))
    assert isinstance(error, PermanentError)
    assert str(error).startswith(f"{message}: ")
    assert says in str(error)
    assert "run login again" in str(error)
    assert "BAD_REQUEST" not in str(error)
