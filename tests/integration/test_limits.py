"""Limits against hostile or broken peers, over real loopback sockets: parse-time limits on
UDP and TCP, slowloris connections cut at the read deadline while others are served, server
transactions per source (stateless 503), and large requests to a UDP peer over TCP first
(RFC 3261 §18.1.1) with UDP as the fallback when TCP is refused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import LARGE_REQUEST, IncomingRequest, SipEngine
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    MediaSettings,
    PbxSettings,
    RecordsSettings,
    RetellSettings,
    Settings,
    SipSettings,
)
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import ParseLimits, StreamParser, parse_message
from sbc.sip.uri import parse_uri

A_HOST = "127.0.0.1"
B_HOST = "127.0.0.2"
C_HOST = "127.0.0.3"


def raw_request(
    method: str = "OPTIONS",
    *,
    transport: str = "UDP",
    host: str = "127.0.0.9",
    branch: str = "z9hG4bKlim1",
    call_id: str = "lim1@x",
    extra: str = "",
    uri: str = "sip:sbc@127.0.0.1",
) -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {host}:5070;branch={branch};rport\r\n"
        "From: <sip:peer@127.0.0.9>;tag=p1\r\n"
        "To: <sip:sbc@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        "Max-Forwards: 70\r\n" + extra + "Content-Length: 0\r\n\r\n"
    ).encode()


def over_limits(uri_length: int) -> tuple[bytes, ...]:
    """One request each over max_headers=20, max_via=2 and max_uri_length=``uri_length``."""
    fillers = "".join(f"X-F{i}: {i}\r\n" for i in range(20))
    vias = "".join(f"Via: SIP/2.0/UDP 192.0.2.{i}:5060;branch=z9hG4bKv{i}\r\n" for i in (1, 2))
    return (
        raw_request(extra=fillers),
        raw_request(extra=vias),
        raw_request(uri="sip:" + "u" * uri_length + "@127.0.0.1"),
    )


@pytest.fixture
async def engines(
    free_port_factory: Callable[..., int],
) -> AsyncIterator[Callable[..., Any]]:
    started: list[SipEngine] = []

    async def factory(host: str = A_HOST, **overrides: Any) -> SipEngine:
        port = free_port_factory(host)
        engine = SipEngine(TransportConfig(bind=host, port=port, **overrides))
        await engine.start()
        started.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in started:
            await engine.stop()


class UdpPeer:
    """A plain UDP socket on ``host`` that sends raw bytes and reads answers."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def send(self, engine: SipEngine, data: bytes) -> None:
        await self.loop.sock_sendto(self.sock, data, (engine.config.bind, engine.config.port))

    async def receive(self) -> Response:
        async with asyncio.timeout(3.0):
            data = await self.loop.sock_recv(self.sock, 65536)
        message = parse_message(data)
        assert isinstance(message, Response)
        return message

    async def nothing_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.loop.sock_recv(self.sock, 65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


# -- parse-time limits -----------------------------------------------------------------------


async def test_over_limit_datagrams_dropped_counted_and_the_listener_serves_on(
    engines: Any,
) -> None:
    engine = await engines(parse_limits=ParseLimits(max_headers=20, max_via=2, max_uri_length=40))
    peer = UdpPeer(A_HOST)
    try:
        for data in over_limits(uri_length=40):
            await peer.send(engine, data)
        await peer.send(engine, raw_request(call_id="after"))
        response = await peer.receive()
        # Nothing came back for the three refused ones: the first answer is the good OPTIONS.
        assert (response.status, response.call_id) == (200, "after")
        stats = engine.transports.stats
        assert stats.limit_exceeded == {"headers": 1, "via": 1, "uri": 1}
        assert stats.datagrams_dropped == 3
        assert engine.stats.requests_received == 1
    finally:
        peer.close()


async def test_over_limit_stream_message_closes_its_connection(engines: Any) -> None:
    engine = await engines(parse_limits=ParseLimits(max_via=1))
    reader, writer = await asyncio.open_connection(*engine.transports.tcp_address)
    extra = "Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bKv2\r\n"
    writer.write(raw_request(transport="TCP", extra=extra))
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # nothing answered: no Via is trusted on such input
    assert engine.transports.stats.limit_exceeded == {"via": 1}
    writer.close()


# -- slowloris -------------------------------------------------------------------------------


async def test_slowloris_connections_cut_at_the_read_deadline_while_others_are_served(
    engines: Any,
) -> None:
    """Twenty connections each trickle one byte every 20 ms (bytes keep coming, so an idle
    timeout would never fire): each is closed at the read deadline of its message, and a
    well-behaved client is answered meanwhile."""
    read_timeout = 1.0
    engine = await engines(read_timeout=read_timeout)
    address = engine.transports.tcp_address
    loop = asyncio.get_running_loop()
    data = raw_request(transport="TCP") * 10  # longer than the deadline at this pace

    trickling = [loop.create_future() for _ in range(20)]

    async def trickle(first_byte_sent: asyncio.Future[None]) -> float:
        reader, writer = await asyncio.open_connection(*address)
        started = loop.time()
        try:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                if not first_byte_sent.done():
                    first_byte_sent.set_result(None)
                if reader.at_eof():
                    break
                try:
                    async with asyncio.timeout(0.02):
                        if await reader.read(1) == b"":
                            break
                except TimeoutError:
                    pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            writer.close()
        return loop.time() - started

    slow = [asyncio.create_task(trickle(started)) for started in trickling]
    async with asyncio.timeout(5):
        await asyncio.gather(*trickling)  # all twenty are trickling before the good client comes
    reader, writer = await asyncio.open_connection(*address)
    writer.write(raw_request(transport="TCP", call_id="good"))
    parser = StreamParser()
    async with asyncio.timeout(3):
        answered = parser.feed(await reader.read(65536))
    assert [(m.status, m.call_id) for m in answered if isinstance(m, Response)] == [(200, "good")]
    writer.close()
    async with asyncio.timeout(10):
        cut_after = await asyncio.gather(*slow)
    # Generous upper margin for a loaded machine; the lower bound is the deadline itself.
    assert all(read_timeout * 0.9 <= t < read_timeout + 3.0 for t in cut_after), cut_after
    assert engine.transports.stats.read_timeouts == 20
    assert engine.stats.requests_received == 1


# -- server transactions per source ----------------------------------------------------------


async def test_transactions_per_source_capped_with_stateless_503(engines: Any) -> None:
    engine = await engines(max_transactions_per_source=3)
    held: list[IncomingRequest] = []
    arrived: asyncio.Queue[IncomingRequest] = asyncio.Queue()
    engine.on_request = arrived.put_nowait

    async def take(count: int) -> None:
        async with asyncio.timeout(3):
            for _ in range(count):
                held.append(await arrived.get())

    peer, other = UdpPeer(A_HOST), UdpPeer(B_HOST)
    try:
        for i in range(3):
            await peer.send(engine, raw_request("MESSAGE", branch=f"z9hG4bKt{i}", call_id=f"t{i}"))
        over = raw_request("MESSAGE", branch="z9hG4bKt3", call_id="t3")
        await peer.send(engine, over)
        refused = await peer.receive()
        assert (refused.status, refused.call_id) == (503, "t3")
        assert refused.headers.get("Retry-After") == "5"
        assert refused.to_tag is not None
        # A retransmission of a request in a transaction still reaches it (no 503, no second
        # handler call); another source is not affected.
        await peer.send(engine, raw_request("MESSAGE", branch="z9hG4bKt0", call_id="t0"))
        assert await peer.nothing_within(0.3)
        await other.send(engine, raw_request("MESSAGE", branch="z9hG4bKo", call_id="other"))
        await take(4)
        assert arrived.empty()
        assert [i.request.call_id for i in held] == ["t0", "t1", "t2", "other"]
        assert engine.stats.transactions_refused == 1
        assert engine.transactions_by_source == {A_HOST: 3, B_HOST: 1}
        for incoming in held:
            incoming.respond(200)
        answers = sorted([(await peer.receive()).call_id for _ in range(3)])
        assert answers == ["t0", "t1", "t2"]
        assert (await other.receive()).call_id == "other"
        # Answered, they no longer count (they only absorb retransmissions until Timer J):
        # the source is served again at once.
        assert engine.transactions_by_source == {}
        assert engine._transaction_sources == {}
        assert len(engine.layer) == 4  # still there for retransmissions
        await peer.send(engine, over)
        await take(1)
        held[4].respond(200)
        assert (await peer.receive()).status == 200
        assert engine.transactions_by_source == {}
    finally:
        peer.close()
        other.close()


# -- RFC 3261 §18.1.1: large requests over TCP -----------------------------------------------


def large_request(uri: str, call_id: str, size: int) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:sbc@127.0.0.1>;tag=a1"),
            ("To", f"<{uri}>"),
            ("Call-ID", call_id),
            ("CSeq", "1 MESSAGE"),
            ("Content-Type", "message/sipfrag"),
        ]
    )
    return Request("MESSAGE", parse_uri(uri), headers, b"x" * size)


async def received_over(engine: SipEngine) -> asyncio.Queue[tuple[str, Request]]:
    """Answers every request 200 and reports (transport it came over, request)."""
    seen: asyncio.Queue[tuple[str, Request]] = asyncio.Queue()

    def handler(incoming: IncomingRequest) -> None:
        seen.put_nowait((incoming.source.transport, incoming.request))
        incoming.respond(200)

    engine.on_request = handler
    return seen


async def test_large_request_to_a_udp_peer_goes_over_tcp(engines: Any) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    seen = await received_over(b)
    uri = f"sip:b@{B_HOST}:{b.config.port}"  # no transport=: UDP by RFC 3263, TCP allowed
    response = await a.send_request(large_request(uri, "big", LARGE_REQUEST))
    assert response.status == 200
    transport, request = seen.get_nowait()
    assert transport == "tcp"
    assert request.top_via.transport == "TCP"
    assert a.stats.large_over_tcp == 1
    assert a.stats.large_tcp_fallbacks == 0
    # Small requests stay on UDP, and so does any request whose URI names UDP.
    assert (await a.send_request(large_request(uri, "small", 100))).status == 200
    assert seen.get_nowait()[0] == "udp"
    explicit = f"{uri};transport=udp"
    assert (await a.send_request(large_request(explicit, "udp", LARGE_REQUEST))).status == 200
    assert seen.get_nowait()[0] == "udp"
    assert a.stats.large_over_tcp == 1


async def test_large_request_falls_back_to_udp_when_tcp_is_refused(engines: Any) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST, tcp=False)  # a 3CX that takes UDP only: TCP connect refused
    seen = await received_over(b)
    uri = f"sip:b@{B_HOST}:{b.config.port}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    handle = a.send_request(large_request(uri, "big1", 2000))
    response = await handle
    assert response.status == 200
    assert loop.time() - started < 2.0
    assert seen.get_nowait()[0] == "udp"
    assert handle.destination == Destination("udp", B_HOST, b.config.port)
    assert handle.attempts == 2
    assert (a.stats.large_over_tcp, a.stats.large_tcp_fallbacks) == (1, 1)
    # The refusal is remembered: the next large request goes straight over UDP.
    handle = a.send_request(large_request(uri, "big2", 2000))
    assert (await handle).status == 200
    assert handle.attempts == 1
    assert seen.get_nowait()[0] == "udp"
    assert (a.stats.large_over_tcp, a.stats.large_tcp_fallbacks) == (1, 1)
    assert a.transports.stats.connect_failures == 1


async def test_a_peer_answering_over_tcp_gets_no_udp_copy(engines: Any) -> None:
    """The UDP fallback is for a connection that could not be made: a 503 that came over TCP
    is the peer's answer, not a reason to send the same request to it again over UDP."""
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    seen: list[str] = []

    def busy(incoming: IncomingRequest) -> None:
        seen.append(incoming.source.transport)
        incoming.respond(503)

    b.on_request = busy
    handle = a.send_request(large_request(f"sip:b@{B_HOST}:{b.config.port}", "busy", 2000))
    assert (await handle).status == 503
    assert handle.attempts == 1
    assert seen == ["tcp"]
    assert (a.stats.large_over_tcp, a.stats.large_tcp_fallbacks) == (1, 0)


async def test_large_requests_stay_on_udp_when_switched_off(engines: Any) -> None:
    a = await engines(A_HOST, large_requests_over_tcp=False)
    b = await engines(B_HOST)
    seen = await received_over(b)
    uri = f"sip:b@{B_HOST}:{b.config.port}"
    assert (await a.send_request(large_request(uri, "big", 2000))).status == 200
    assert seen.get_nowait()[0] == "udp"
    assert a.stats.large_over_tcp == 0


# -- the whole service: settings to limits to metrics ------------------------------------------


async def test_service_applies_the_limit_settings_and_counts_each_hit(
    tmp_path: Any, free_port_factory: Callable[..., int]
) -> None:
    """From the [sip] settings to a running Service: over-limit datagrams dropped, a stream
    message too large answered 513 and closed, an OPTIONS still answered, and each hit in
    sbc_limit_hits_total."""
    port = free_port_factory(A_HOST)
    settings = Settings(
        sip=SipSettings(
            bind=A_HOST,
            port=port,
            max_message_size=1024,
            max_headers=20,
            max_via=2,
            max_uri_length=64,
        ),
        pbx=PbxSettings(
            host=B_HOST,  # nothing there: registration keeps failing, which is not tested here
            port=free_port_factory(B_HOST),
            extension="6001",
            password="secret",  # type: ignore[arg-type]
            trusted=("127.0.0.0/8",),  # type: ignore[arg-type]
            keepalive="off",
        ),
        retell=RetellSettings(number="+14155550100", host=C_HOST),
        media=MediaSettings(mode="passthrough"),
        admin=AdminSettings(listen=f"{A_HOST}:{free_port_factory(A_HOST)}"),
        records=RecordsSettings(path=""),
    )
    service = Service(settings)
    await service.start()
    peer = UdpPeer(A_HOST)
    try:
        engine = service.engine
        for data in over_limits(uri_length=64):
            await peer.send(engine, data)
        await peer.send(engine, raw_request(call_id="after"))
        response = await peer.receive()
        assert (response.status, response.call_id) == (200, "after")

        assert engine.transports.tcp_address is not None
        reader, writer = await asyncio.open_connection(*engine.transports.tcp_address)
        big = raw_request("MESSAGE", transport="TCP", call_id="big").replace(
            b"Content-Length: 0", b"Content-Length: 2000"
        )
        writer.write(big)
        async with asyncio.timeout(3):
            answer = await reader.read()
        writer.close()
        too_large = parse_message(answer)
        assert isinstance(too_large, Response)
        assert (too_large.status, too_large.call_id) == (513, "big")

        text = service.metrics.render().decode()
        hits = {
            sample.labels["limit"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "sbc_limit_hits_total"
        }
        assert hits["headers"] == 1
        assert hits["via"] == 1
        assert hits["uri"] == 1
        assert hits["message_size"] == 1
        assert hits["transactions_per_source"] == 0
        assert hits["calls_per_source"] == 0
    finally:
        peer.close()
        await service.stop()
