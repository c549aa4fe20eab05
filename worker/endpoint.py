"""Where a session connects: ``TELEGRAM_DC`` / ``TELEGRAM_TEST_SERVERS`` and the endpoint's key.

Used by the gated client (:mod:`worker.tgclient`) and by ``login`` (:mod:`worker.login`), which
build their Telethon clients differently but must point them at the same place.
"""

from __future__ import annotations

from loguru import logger
from telethon import TelegramClient
from telethon.crypto import rsa

from fleet.settings import ConfigError
from worker.settings import WorkerSettings


def uses_ipv6(settings: WorkerSettings) -> bool:
    """Whether the configured endpoint is an IPv6 address (Telethon must be told, or its
    ``connect`` replaces the address with its default DC)."""
    endpoint = settings.telegram_endpoint()
    return endpoint is not None and ":" in endpoint[1]


def apply_endpoint(client: TelegramClient, settings: WorkerSettings) -> None:
    """Point a client's session at ``TELEGRAM_DC`` / ``TELEGRAM_TEST_SERVERS`` (before
    ``connect``), and teach Telethon the endpoint's public key if a file names one."""
    key_file = settings.telegram_dc_public_key_file
    if key_file is not None:
        try:
            rsa.add_key(key_file.read_text(encoding="ascii"), old=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"TELEGRAM_DC_PUBLIC_KEY_FILE: {key_file} is not a PEM RSA public key "
                f"({type(exc).__name__})"
            ) from exc
    endpoint = settings.telegram_endpoint()
    if endpoint is None:
        return
    dc_id, host, port = endpoint
    session = client.session
    if session.auth_key is not None and session.dc_id not in (0, dc_id):
        # Logged in, and Telegram moved the account to its home DC (an address the endpoint
        # itself gave during login): the key belongs there, so that is where to connect.
        logger.info("session is on DC {} of the configured endpoint; keeping it", session.dc_id)
        return
    if (session.dc_id, session.server_address, session.port) != (dc_id, host, port):
        session.set_dc(dc_id, host, port)
        session.save()
