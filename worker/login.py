"""``python -m worker login --session NAME``: create a session interactively.

Kept apart from the long-running session (:mod:`worker.telegram`): it uses a plain Telethon
client (no gate, no retries: a person is waiting) and asks for the phone, code and password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from telethon import TelegramClient, errors
from telethon.sessions import SQLiteSession

from fleet.settings import ConfigError
from worker.endpoint import apply_endpoint, uses_ipv6
from worker.errors import PermanentError, SessionRevoked, TelegramError, TransientError
from worker.rpcerrors import translate
from worker.session_file import credentials, protect, session_path
from worker.settings import WorkerSettings
from worker.tgclient import connect_and_check, quiet_disconnect


async def login(
    settings: WorkerSettings,
    session_name: str,
    *,
    ask: Callable[[str], str],
    ask_secret: Callable[[str], str],
) -> str:
    """Log a session in interactively; returns the account's display name.

    ``ask`` prompts for plain values (the phone, unless ``TELEGRAM_PHONE`` is set),
    ``ask_secret`` for the login code and the 2FA password; none of them is logged or echoed.
    """
    api_id, api_hash = credentials(settings)
    path = session_path(settings, session_name)
    client = TelegramClient(
        SQLiteSession(str(path)),
        api_id,
        api_hash,
        flood_sleep_threshold=0,
        receive_updates=False,
        timeout=int(max(1, settings.telegram_request_timeout_seconds)),
        connection_retries=2,
        use_ipv6=uses_ipv6(settings),
    )
    apply_endpoint(client, settings)
    protect(path)
    bound = settings.connect_timeout_s
    try:
        try:
            authorized = await asyncio.wait_for(connect_and_check(client), bound)
        except TimeoutError as exc:
            raise TransientError(
                f"TIMEOUT: no answer from Telegram within {bound:g}s while connecting",
                rpc_error="TIMEOUT",
            ) from exc
        if not authorized:
            await _sign_in(client, settings, ask=ask, ask_secret=ask_secret)
        me = await client.get_me()
    except TelegramError:
        raise
    except errors.PhoneNumberInvalidError as exc:
        raise ConfigError("TELEGRAM_PHONE: PHONE_NUMBER_INVALID: not a valid phone number") from exc
    except (errors.RPCError, OSError, EOFError) as exc:
        # translate() names each sign-in refusal (PHONE_NUMBER_UNOCCUPIED: no Telegram account
        # uses this phone number; PHONE_CODE_EXPIRED; PASSWORD_HASH_INVALID …).
        raise login_error(exc) from exc
    finally:
        await quiet_disconnect(client)
        protect(path)
    if me is None:
        raise SessionRevoked("login did not complete")
    name = " ".join(p for p in (me.first_name, me.last_name) if p) or "(no name)"
    return f"{name} (@{me.username})" if me.username else name


def login_error(exc: BaseException) -> TelegramError:
    """What a failed login tells the user: the RPC name and what to do about it."""
    error = translate(exc)
    if isinstance(error, PermanentError):
        return PermanentError(f"{error}; run login again", rpc_error=error.rpc_error)
    return error


async def _sign_in(
    client: TelegramClient,
    settings: WorkerSettings,
    *,
    ask: Callable[[str], str],
    ask_secret: Callable[[str], str],
) -> None:
    phone = (
        settings.telegram_phone.get_secret_value()
        if settings.telegram_phone is not None
        else ask("Phone number (international format, e.g. +441234567890): ").strip()
    )
    sent = await client.send_code_request(phone)
    for attempt in range(3):
        code = ask_secret("Login code (sent by Telegram): ").strip()
        try:
            await client.sign_in(phone=phone, code=code, phone_code_hash=sent.phone_code_hash)
            return
        except errors.SessionPasswordNeededError:
            await client.sign_in(password=ask_secret("Two-step verification password: "))
            return
        except errors.PhoneCodeInvalidError:
            if attempt == 2:
                raise
