"""A SipEngine with no sockets, for unit tests that feed it datagrams by hand and read what it
sends (shared by the engine, ladder and fast-path tests)."""

from __future__ import annotations

import asyncio

from sbc.net.addresses import TransportConfig
from sbc.net.engine import SipEngine


class Sink:
    """Stands in for the UDP transport's socket: keeps every datagram sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, address: object) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


def engine_without_sockets() -> tuple[SipEngine, Sink]:
    """An engine on 127.0.0.1:5060 that never opened a socket, on the running loop; datagrams go
    in through its transports by hand, and out into the returned sink."""
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=5060))
    engine._loop = asyncio.get_running_loop()
    sink = Sink()
    engine.transports._udp = sink  # type: ignore[assignment]
    return engine, sink
