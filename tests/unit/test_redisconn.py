"""The one Redis client factory: every process gets the same documented options."""

from __future__ import annotations

import pytest

from fleet.redisconn import (
    CONNECT_TIMEOUT_S,
    HEALTH_CHECK_INTERVAL_S,
    SOCKET_SLACK_S,
    connect,
    connect_sync,
)


@pytest.mark.parametrize("factory", [connect, connect_sync])
def test_clients_retry_nothing_themselves_and_time_out_above_their_longest_block(
    factory: object,
) -> None:
    client = factory("redis://127.0.0.1:1/0", pop_timeout_s=2.0)  # type: ignore[operator]
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.0 + SOCKET_SLACK_S
    assert kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT_S
    assert kwargs["health_check_interval"] == HEALTH_CHECK_INTERVAL_S
    # An outage must reach RedisLink at once, not after hidden retries.
    assert kwargs["retry"].get_retries() == 0


def test_a_caller_may_lower_the_connect_timeout_but_never_raise_it() -> None:
    low = connect("redis://127.0.0.1:1/0", connect_timeout_s=1.0)
    high = connect("redis://127.0.0.1:1/0", connect_timeout_s=60.0)
    assert low.connection_pool.connection_kwargs["socket_connect_timeout"] == 1.0
    assert high.connection_pool.connection_kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT_S


def test_rediss_urls_give_tls_and_credentials_reach_auth() -> None:
    client = connect("rediss://alice:pw@127.0.0.1:1/0")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kwargs["username"], kwargs["password"]) == ("alice", "pw")
