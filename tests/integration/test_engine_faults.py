"""Engine faults found by fuzzing (tests/fuzz_harness.py), over real loopback sockets: an ACK
sbc cannot read is dropped at the door instead of failing deep in the transaction layer or the
call manager, and a handler failing on an event is logged as such (the log call itself used to
raise, taking the rest of the datagram's processing with it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import structlog
from peers import free_port

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

pytestmark = pytest.mark.integration

HOST = "127.0.0.151"
PEER = "127.0.0.152"


def ack(*, call_id: str | None = "a1@x", to: str = "<sip:sbc@127.0.0.151>;tag=t1") -> bytes:
    return (
        "ACK sip:sbc@127.0.0.151 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {PEER}:5060;branch=z9hG4bK-ack-{call_id}-{len(to)};rport\r\n"
        f"From: <sip:peer@{PEER}>;tag=f1\r\n"
        f"To: {to}\r\n"
        + (f"Call-ID: {call_id}\r\n" if call_id is not None else "")
        + "CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def options(n: int) -> bytes:
    return (
        "OPTIONS sip:sbc@127.0.0.151 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {PEER}:5060;branch=z9hG4bK-opt-{n};rport\r\n"
        f"From: <sip:peer@{PEER}>;tag=o{n}\r\nTo: <sip:sbc@127.0.0.151>\r\n"
        f"Call-ID: o{n}@x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
async def engine() -> AsyncIterator[SipEngine]:
    engine = SipEngine(TransportConfig(bind=HOST, port=free_port(HOST), tcp=False))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def exchange(engine: SipEngine, *datagrams: bytes) -> Response:
    """Send ``datagrams`` then an OPTIONS from PEER; returns the OPTIONS' answer (datagrams are
    handled in order, so everything before it was processed)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PEER, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, engine.config.port))
        for data in (*datagrams, options(len(datagrams))):
            await loop.sock_sendall(sock, data)
        async with asyncio.timeout(5):
            while True:
                answer = parse_message(await loop.sock_recv(sock, 65536))
                if isinstance(answer, Response) and answer.cseq.method == "OPTIONS":
                    return answer


async def test_unreadable_acks_are_dropped_before_the_handler(engine: SipEngine) -> None:
    seen: list[Request] = []

    def on_ack(request: Request, source: Destination) -> None:
        # What the call manager does first with an ACK: its dialog key.
        seen.append(request)
        _ = (request.call_id, request.to_tag)

    engine.on_ack = on_ack
    bad = [
        ack(call_id=None),
        ack(to="<\xf3ip:sbc@127.0.0.151>;tag=t1"),
        ack(to='"x" <sip:sbc@127.0.0.151;tag=t1'),
        ack(to="<sip:sbc@127.0.0.151>;tag=t1;,,;"),
    ]
    with structlog.testing.capture_logs() as logs:
        answer = await exchange(engine, *bad, ack(call_id="good@x"))
    assert answer.status == 200
    assert [r.call_id for r in seen] == ["good@x"]
    assert engine.stats.requests_rejected == len(bad)
    assert [e for e in logs if e["log_level"] in ("error", "exception", "critical")] == []
    assert [e["event"] for e in logs if e["event"] == "ack_dropped"] == ["ack_dropped"] * len(bad)


async def test_a_handler_failing_on_an_ack_is_logged_and_the_rest_is_processed(
    engine: SipEngine,
) -> None:
    def on_ack(request: Request, source: Destination) -> None:
        raise RuntimeError("bug")

    engine.on_ack = on_ack
    with structlog.testing.capture_logs() as logs:
        answer = await exchange(engine, ack(call_id="boom@x"))
    assert answer.status == 200
    failed = [e for e in logs if e["event"] == "event_dispatch_failed"]
    assert [(e["kind"], e["log_level"]) for e in failed] == [("AckReceived", "error")]
