"""OPTIONS answered by the engine, with SIPp (Debian ``sip-tester``) as the client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sbc.net.addresses import TransportConfig
from sbc.net.engine import SipEngine

HOST = "127.0.0.1"
CALLS = 50


@pytest.fixture
async def engine(free_port_factory: Callable[..., int]) -> AsyncIterator[SipEngine]:
    engine = SipEngine(TransportConfig(bind=HOST, port=free_port_factory(HOST)))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.mark.parametrize("transport", ["u1", "t1", "tn"])
async def test_options_answered_by_sipp_client(
    engine: SipEngine, sipp: Callable[..., Awaitable[object]], transport: str
) -> None:
    """The scenario fails a call unless the 200 names INVITE in Allow and SDP in Accept."""
    result = await sipp(
        "options_uac.xml",
        f"{HOST}:{engine.config.port}",
        transport=transport,
        calls=CALLS,
        rate=200,
        time_limit=20,
        extra=["-max_socket", "200"] if transport == "tn" else [],
    )
    assert result.returncode == 0, (result.stderr, result.errors)  # type: ignore[attr-defined]
    assert result.successful == CALLS  # type: ignore[attr-defined]
    assert result.failed == 0  # type: ignore[attr-defined]
    assert engine.stats.requests_received == CALLS
    if transport == "u1":
        assert engine.transports.stats.datagrams_received == CALLS
    else:
        assert engine.transports.stats.stream_messages_received == CALLS
        expected_connections = 1 if transport == "t1" else CALLS
        assert engine.transports.stats.connections_accepted == expected_connections
