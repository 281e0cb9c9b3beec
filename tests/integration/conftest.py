"""Fixtures shared by the integration tests. The helpers behind them are plain modules that
tests import by name: ``peers`` (free ports, required binaries, a fake DNS server) and
``sipp_helpers`` (the one way to run SIPp)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from peers import FakeDns, free_port
from sipp_helpers import SippResult, run_sipp


@pytest.fixture
def free_port_factory() -> Callable[..., int]:
    """``free_port(host="127.0.0.1", udp=True) -> int``."""
    return free_port


@pytest.fixture
def sipp(tmp_path: Path) -> Callable[..., Awaitable[SippResult]]:
    """``await sipp(scenario, "127.0.0.1:PORT", transport="t1", calls=50, ...)``; see run_sipp."""

    def runner(scenario: str, remote: str, **kwargs: object) -> Awaitable[SippResult]:
        return run_sipp(scenario, remote, workdir=tmp_path, **kwargs)  # type: ignore[arg-type]

    return runner


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    """A FakeDns listening on 127.0.0.53 (a free port); ``fake_dns.address`` is (ip, port)."""
    loop = asyncio.get_running_loop()
    server = FakeDns()
    host = "127.0.0.53"
    transport, _ = await loop.create_datagram_endpoint(
        lambda: server, local_addr=(host, free_port(host))
    )
    server.address = transport.get_extra_info("sockname")[:2]
    try:
        yield server
    finally:
        transport.close()
