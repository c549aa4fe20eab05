"""Which MTProto endpoint a client is pointed at: TELEGRAM_DC, TELEGRAM_TEST_SERVERS and the
server key file, applied to the real Telethon client's session before it connects."""

from __future__ import annotations

from pathlib import Path

import pytest
import rsa as rsalib
from pydantic import ValidationError
from telethon import TelegramClient
from telethon.crypto import AuthKey, rsa
from telethon.sessions import MemorySession

from fleet.settings import ConfigError
from worker.endpoint import apply_endpoint, uses_ipv6
from worker.settings import TEST_DC, WorkerSettings


def client(**kwargs: object) -> TelegramClient:
    return TelegramClient(MemorySession(), 1, "0" * 32, **kwargs)  # type: ignore[arg-type]


def test_telegram_dc_points_a_fresh_session_at_the_endpoint(clean_env: object) -> None:
    settings = WorkerSettings(telegram_dc="3@10.1.2.3:4430")
    c = client()
    apply_endpoint(c, settings)
    assert (c.session.dc_id, c.session.server_address, c.session.port) == (3, "10.1.2.3", 4430)
    assert not uses_ipv6(settings)


def test_an_ipv6_endpoint_is_unbracketed_and_needs_ipv6(clean_env: object) -> None:
    settings = WorkerSettings(telegram_dc="1@[::1]:4430")
    assert settings.telegram_endpoint() == (1, "::1", 4430)
    assert uses_ipv6(settings)


def test_test_servers_mean_telegrams_test_dc_unless_telegram_dc_says_otherwise(
    clean_env: object,
) -> None:
    assert WorkerSettings(telegram_test_servers=True).telegram_endpoint() == TEST_DC
    assert WorkerSettings(
        telegram_test_servers=True, telegram_dc="1@127.0.0.1:443"
    ).telegram_endpoint() == (1, "127.0.0.1", 443)
    assert WorkerSettings().telegram_endpoint() is None


def test_a_session_logged_in_on_another_dc_of_the_endpoint_keeps_it(clean_env: object) -> None:
    c = client()
    c.session.set_dc(4, "10.9.9.9", 443)
    c.session.auth_key = AuthKey(b"\x01" * 256)
    apply_endpoint(c, WorkerSettings(telegram_dc="2@10.1.2.3:443"))
    assert (c.session.dc_id, c.session.server_address) == (4, "10.9.9.9")


@pytest.mark.parametrize("value", ["10.0.0.1:443", "2@10.0.0.1", "0@h:1", "2@h:p", "2@a b:1"])
def test_a_malformed_telegram_dc_is_refused_with_the_expected_shape(
    clean_env: object, value: str
) -> None:
    with pytest.raises(ValidationError, match="ID@HOST:PORT"):
        WorkerSettings(telegram_dc=value)


def test_the_server_key_file_teaches_telethon_the_endpoints_key(
    clean_env: object, tmp_path: Path
) -> None:
    public, _ = rsalib.newkeys(512)
    pem = tmp_path / "server.pem"
    pem.write_bytes(public.save_pkcs1())
    apply_endpoint(client(), WorkerSettings(telegram_dc_public_key_file=pem))
    fingerprint = rsa._compute_fingerprint(public)
    try:
        assert fingerprint in rsa._server_keys
    finally:  # Telethon's key table is process-wide
        rsa._server_keys.pop(fingerprint, None)


def test_a_server_key_file_that_is_not_a_key_is_a_config_error(
    clean_env: object, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match="TELEGRAM_DC_PUBLIC_KEY_FILE"):
        apply_endpoint(client(), WorkerSettings(telegram_dc_public_key_file=junk))
    with pytest.raises(ValidationError, match="not a readable file"):
        WorkerSettings(telegram_dc_public_key_file=tmp_path / "missing.pem")
