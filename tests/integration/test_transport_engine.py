"""The engine over real loopback sockets: framing seen from a peer, RFC 3261 §18 addressing,
transport errors as 503, DNS failures without stalls, failover, and the API the B2BUA uses."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.dns import Resolver, make_resolver
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.uri import parse_uri

A_HOST = "127.0.0.1"
B_HOST = "127.0.0.2"


def raw_request(
    method: str = "OPTIONS",
    *,
    via: str = "SIP/2.0/TCP 127.0.0.9:5070;branch=z9hG4bKraw1;rport",
    call_id: str = "raw1@x",
    extra: str = "",
    body: bytes = b"",
    max_forwards: bool = True,
) -> bytes:
    head = (
        f"{method} sip:sbc@127.0.0.1 SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "From: <sip:peer@127.0.0.9>;tag=p1\r\n"
        "To: <sip:sbc@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        + ("Max-Forwards: 70\r\n" if max_forwards else "")
        + extra
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def new_request(method: str, uri: str, call_id: str) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:sbc@127.0.0.1>;tag=a1"),
            ("To", f"<{uri}>"),
            ("Call-ID", call_id),
            ("CSeq", f"1 {method}"),
        ]
    )
    return Request(method, parse_uri(uri), headers)


async def start_engine(host: str, port: int, **overrides: Any) -> SipEngine:
    resolver = overrides.pop("resolver", None)
    engine = SipEngine(TransportConfig(bind=host, port=port, **overrides), resolver=resolver)
    await engine.start()
    return engine


@pytest.fixture
async def engines(
    free_port_factory: Callable[..., int],
) -> AsyncIterator[Callable[..., Any]]:
    started: list[SipEngine] = []

    async def factory(host: str = A_HOST, **overrides: Any) -> SipEngine:
        engine = await start_engine(host, free_port_factory(host), **overrides)
        started.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in started:
            await engine.stop()


async def tcp_client(engine: SipEngine) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert engine.transports.tcp_address is not None
    reader, writer = await asyncio.open_connection(*engine.transports.tcp_address)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[Response]:
    parser = StreamParser()
    out: list[Response] = []
    async with asyncio.timeout(5):
        while len(out) < count:
            data = await reader.read(65536)
            assert data, "connection closed"
            for message in parser.feed(data):
                assert isinstance(message, Response)
                out.append(message)
    return out


# -- framing, seen from the peer -------------------------------------------------------------


async def test_tcp_request_one_byte_at_a_time_answered(engines: Any) -> None:
    engine = await engines()
    reader, writer = await tcp_client(engine)
    data = raw_request()
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        if i % 16 == 0:
            await asyncio.sleep(0.001)  # pacing so the bytes leave as separate segments
    [response] = await read_responses(reader, 1)
    assert response.status == 200
    assert response.call_id == "raw1@x"
    assert "INVITE" in response.headers.values("Allow")
    assert response.headers.get("Accept") == "application/sdp"
    assert "replaces" in response.headers.values("Supported")
    assert response.to_tag is not None
    writer.close()


async def test_two_requests_in_one_segment_both_answered(engines: Any) -> None:
    engine = await engines()
    reader, writer = await tcp_client(engine)
    second_via = "SIP/2.0/TCP 127.0.0.9:5070;branch=z9hG4bKraw2;rport"
    writer.write(raw_request(call_id="one") + raw_request(call_id="two", via=second_via))
    responses = await read_responses(reader, 2)
    assert [(r.status, r.call_id) for r in responses] == [(200, "one"), (200, "two")]
    writer.close()


async def test_oversized_request_refused_listener_keeps_serving(engines: Any) -> None:
    engine = await engines(max_message_size=4096)
    reader, writer = await tcp_client(engine)
    writer.write(raw_request("MESSAGE", extra="Content-Type: text/plain\r\n", body=b"x" * 5000))
    async with asyncio.timeout(3):
        answer = await reader.read()  # up to the close
    # The head parsed: 513 first (RFC 3261 §21.5.14), then the connection is closed.
    response = parse_message(answer)
    assert isinstance(response, Response)
    assert (response.status, response.call_id) == (513, "raw1@x")
    reader2, writer2 = await tcp_client(engine)
    writer2.write(raw_request(call_id="after"))
    [response] = await read_responses(reader2, 1)
    assert (response.status, response.call_id) == (200, "after")
    assert engine.transports.stats.oversized == 1
    writer.close()
    writer2.close()


# -- RFC 3261 §18.2 / RFC 3581 addressing over UDP --------------------------------------------


async def test_udp_response_to_rport_with_received_stamped(engines: Any) -> None:
    engine = await engines()
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((A_HOST, 0))
        sock.setblocking(False)
        port = sock.getsockname()[1]
        # sent-by names another host and port: only rport gets the answer back to us.
        via = "SIP/2.0/UDP 192.0.2.1:5999;branch=z9hG4bKrp1;rport"
        await loop.sock_sendto(sock, raw_request(via=via), (A_HOST, engine.config.port))
        async with asyncio.timeout(3):
            data = await loop.sock_recv(sock, 65536)
    response = parse_message(data)
    assert isinstance(response, Response)
    assert response.status == 200
    top = response.top_via
    assert top.received == A_HOST
    assert top.rport == port
    assert top.host == "192.0.2.1"


async def test_udp_response_without_rport_goes_to_sent_by_port(engines: Any) -> None:
    engine = await engines()
    loop = asyncio.get_running_loop()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener,
    ):
        sender.bind((A_HOST, 0))
        listener.bind((A_HOST, 0))
        listener.setblocking(False)
        via = f"SIP/2.0/UDP {A_HOST}:{listener.getsockname()[1]};branch=z9hG4bKsb1"
        sender.sendto(raw_request(via=via), (A_HOST, engine.config.port))
        async with asyncio.timeout(3):
            data = await loop.sock_recv(listener, 65536)
    response = parse_message(data)
    assert isinstance(response, Response)
    assert response.status == 200
    assert response.top_via.received is None  # sent-by host matched the source


# -- validation and handlers -----------------------------------------------------------------


async def _udp_exchange(engine: SipEngine, data: bytes) -> Response:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((A_HOST, 0))
        sock.setblocking(False)
        await loop.sock_sendto(sock, data, (A_HOST, engine.config.port))
        async with asyncio.timeout(3):
            reply = await loop.sock_recv(sock, 65536)
    response = parse_message(reply)
    assert isinstance(response, Response)
    return response


def _udp_via(branch: str) -> str:
    return f"SIP/2.0/UDP 127.0.0.9:5070;branch={branch};rport"


async def test_invalid_requests_answered_with_their_status(engines: Any) -> None:
    engine = await engines()
    r420 = await _udp_exchange(
        engine, raw_request(via=_udp_via("z9hG4bKv1"), extra="Require: foo\r\n")
    )
    assert r420.status == 420
    assert r420.headers.get("Unsupported") == "foo"
    r400 = await _udp_exchange(
        engine, raw_request(via=_udp_via("z9hG4bKv2"), call_id="v2", max_forwards=False)
    )
    assert r400.status == 400
    assert r400.to_tag is not None
    assert engine.stats.requests_rejected == 2


async def test_no_handler_means_405(engines: Any) -> None:
    engine = await engines()
    response = await _udp_exchange(engine, raw_request("INFO", via=_udp_via("z9hG4bKn1")))
    assert response.status == 405
    assert response.headers.get("Allow") == "OPTIONS"


async def test_handler_exception_answered_500_listener_survives(engines: Any) -> None:
    engine = await engines()
    seen: list[str] = []

    def handler(incoming: IncomingRequest) -> None:
        seen.append(incoming.request.call_id)
        if incoming.request.call_id == "answered":
            incoming.respond(486)
        raise RuntimeError("bug in a handler")

    engine.on_request = handler
    response = await _udp_exchange(engine, raw_request("INFO", via=_udp_via("z9hG4bKh1")))
    assert response.status == 500
    assert engine.stats.handler_errors == 1
    # The handler still gets the next request; an answer sent before the bug is the one that
    # goes out (no 500 instead of it).
    data = raw_request("INFO", via=_udp_via("z9hG4bKh2"), call_id="answered")
    response = await _udp_exchange(engine, data)
    assert response.status == 486
    ok = await _udp_exchange(engine, raw_request(via=_udp_via("z9hG4bKh3"), call_id="h3"))
    assert ok.status == 200
    assert seen == ["raw1@x", "answered"]
    assert engine.stats.handler_errors == 2


async def test_options_inside_dialog_goes_to_handler(engines: Any) -> None:
    engine = await engines()
    seen: list[str] = []

    def handler(incoming: IncomingRequest) -> None:
        seen.append(incoming.method)
        incoming.respond(481)

    engine.on_request = handler
    data = raw_request(via=_udp_via("z9hG4bKd1")).replace(
        b"To: <sip:sbc@127.0.0.1>", b"To: <sip:sbc@127.0.0.1>;tag=dlg"
    )
    response = await _udp_exchange(engine, data)
    assert response.status == 481
    assert seen == ["OPTIONS"]


# -- client transactions ---------------------------------------------------------------------


async def test_request_to_closed_tcp_port_gets_503(
    engines: Any, free_port_factory: Callable[..., int]
) -> None:
    engine = await engines()
    loop = asyncio.get_running_loop()
    closed = Destination("tcp", A_HOST, free_port_factory(A_HOST))
    started = loop.time()
    handle = engine.send_request(new_request("OPTIONS", f"sip:x@{A_HOST}", "c503"), closed)
    responses = [response async for response in handle]
    elapsed = loop.time() - started
    assert [r.status for r in responses] == [503]
    assert responses[0].call_id == "c503"
    assert elapsed < 1.0, elapsed
    assert handle.attempts == 1
    assert handle.key is not None
    assert engine.transports.stats.connect_failures == 1


async def test_options_between_engines_over_udp_and_tcp(engines: Any) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    for transport in ("udp", "tcp"):
        uri = f"sip:b@{B_HOST}:{b.config.port};transport={transport.upper()}"
        handle = a.send_request(new_request("OPTIONS", uri, f"ab-{transport}"))
        response = await handle
        assert response.status == 200
        assert handle.destination == Destination(transport, B_HOST, b.config.port)
        assert "INVITE" in response.headers.values("Allow")
        sent = await handle.wait_sent()
        via = sent.top_via
        assert via.transport == transport.upper()
        assert (via.host, via.port) == (A_HOST, a.config.port)
        assert via.has_rport
        assert via.branch is not None and via.branch.startswith("z9hG4bK")


async def test_timeout_gives_408_after_retransmissions(engines: Any) -> None:
    engine = await engines(t1=0.02)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((B_HOST, 0))
        silent.setblocking(False)
        dest = Destination("udp", B_HOST, silent.getsockname()[1])
        started = loop.time()
        response = await engine.send_request(new_request("OPTIONS", "sip:x@b", "t408"), dest)
        elapsed = loop.time() - started
        received = 0
        while True:
            try:
                silent.recv(65536)
                received += 1
            except BlockingIOError:
                break
    assert response.status == 408
    # RFC 3261 Table 4: Timer F = 64*T1.
    assert 64 * 0.02 <= elapsed < 64 * 0.02 + 1.0, elapsed
    assert received >= 5  # Timer E retransmissions


def _resolver_for(fake_dns: Any, timeout: float) -> Resolver:
    return Resolver(
        resolver=make_resolver([fake_dns.address[0]], fake_dns.address[1]),
        timeout=timeout,
        address_types=("A",),
    )


async def test_unresolvable_host_fails_in_bound_without_stalling_others(
    engines: Any, fake_dns: Any
) -> None:
    fake_dns.silent.add("_sip._tcp.dead.test")
    a = await engines(A_HOST, resolver=_resolver_for(fake_dns, 1.0))
    b = await engines(B_HOST)
    loop = asyncio.get_running_loop()
    started = loop.time()
    dead = a.send_request(
        new_request("OPTIONS", "sip:x@dead.test", "dead"), "sip:dead.test;transport=tcp"
    )
    live_uri = f"sip:b@{B_HOST}:{b.config.port};transport=tcp"
    live = a.send_request(new_request("OPTIONS", live_uri, "live"))
    live_response = await live
    live_elapsed = loop.time() - started
    assert not dead.done
    dead_response = await dead
    dead_elapsed = loop.time() - started
    assert live_response.status == 200
    assert live_elapsed < 0.9, live_elapsed  # well before the 1 s DNS timeout
    assert dead_response.status == 503
    assert 1.0 <= dead_elapsed < 2.0, dead_elapsed
    assert a.stats.dns_failures == 1
    # A name that does not exist fails at once.
    started = loop.time()
    nx = await a.send_request(new_request("OPTIONS", "sip:x@nx.test", "nx"), "sip:nx.test")
    assert nx.status == 503
    assert loop.time() - started < 0.5


async def test_failover_to_next_srv_target_with_new_branch(
    engines: Any, fake_dns: Any, free_port_factory: Callable[..., int]
) -> None:
    b = await engines(B_HOST)
    closed_port = free_port_factory(A_HOST)
    fake_dns.add(
        "_sip._tcp.peer.test",
        "SRV",
        f"10 0 {closed_port} first.peer.test.",
        f"20 0 {b.config.port} second.peer.test.",
    )
    fake_dns.add("first.peer.test", "A", A_HOST)
    fake_dns.add("second.peer.test", "A", B_HOST)
    a = await engines(A_HOST, resolver=_resolver_for(fake_dns, 1.0))
    handle = a.send_request(
        new_request("OPTIONS", "sip:x@peer.test", "fo"), "sip:peer.test;transport=tcp"
    )
    first = await handle.wait_sent()
    response = await handle
    assert response.status == 200
    assert handle.attempts == 2
    assert handle.destination is not None
    assert handle.destination.address == (B_HOST, b.config.port)
    assert handle.request.top_via.branch != first.top_via.branch
    assert len(handle.request.headers.values("Via")) == 1
    assert [r.status for r in handle.responses] == [200]
    assert a.stats.failovers == 1
    assert b.stats.requests_received == 1


async def test_invite_cancel_and_ack_between_engines(engines: Any) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    acks: list[Request] = []
    acked = asyncio.Event()

    def on_ack(ack: Request, source: Destination) -> None:
        acks.append(ack)
        acked.set()

    b.on_ack = on_ack
    ringing = asyncio.Event()

    def uas(incoming: IncomingRequest) -> None:
        if incoming.request.call_id == "answered":
            incoming.respond(200, headers=(("Contact", f"<sip:b@{B_HOST}:{b.config.port}>"),))
        else:
            incoming.respond(180)
            ringing.set()

    b.on_request = uas
    target = Destination("udp", B_HOST, b.config.port)
    # INVITE, then CANCEL after the 180: the engine answers the INVITE 487 by default.
    invite = a.send_request(new_request("INVITE", "sip:b@x", "cancelled"), target)
    statuses = []
    async for response in invite:
        statuses.append(response.status)
        if response.status == 180:
            cancel = a.cancel(invite)
            assert (await cancel).status == 200
    assert statuses == [180, 487]
    # INVITE answered 200, then ACK (a new branch, stateless) reaches the far end's on_ack.
    answered = a.send_request(new_request("INVITE", "sip:b@x", "answered"), target)
    assert (await answered).status == 200
    ack = new_request("ACK", "sip:b@x", "answered")
    sent = await a.send_ack(ack, target)
    assert sent.top_via.branch != answered.request.top_via.branch
    async with asyncio.timeout(3):
        await acked.wait()
    assert acks[0].call_id == "answered"
    # The same ACK again (as for a retransmitted 2xx), outside any transaction.
    acked.clear()
    a.send_stateless(sent, target)
    async with asyncio.timeout(3):
        await acked.wait()
    assert [ack.top_via.branch for ack in acks] == [sent.top_via.branch] * 2


async def test_stop_ends_pending_requests_and_leaves_no_task(engines: Any) -> None:
    engine = await engines()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((B_HOST, 0))
        dest = Destination("udp", B_HOST, silent.getsockname()[1])
        handle = engine.send_request(new_request("OPTIONS", "sip:x@b", "stop"), dest)
        await handle.wait_sent()
        await engine.stop()
    assert (await handle).status == 503
    assert engine._tasks == set()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_loose_route_is_the_next_hop(engines: Any) -> None:
    a = await engines(A_HOST)
    b = await engines(B_HOST)
    request = new_request("OPTIONS", "sip:someone@unresolvable.invalid", "route")
    route = f"<sip:{B_HOST}:{b.config.port};transport=tcp;lr>"
    request = Request(request.method, request.uri, request.headers.add("Route", route))
    handle = a.send_request(request)
    assert (await handle).status == 200
    assert handle.destination == Destination("tcp", B_HOST, b.config.port)


async def test_response_reopens_connection_when_the_request_one_closed(engines: Any) -> None:
    """RFC 3261 §18.2.2: the connection is gone, so a new one goes to the Via's sent-by."""
    engine = await engines()
    pending: list[IncomingRequest] = []

    def handler(incoming: IncomingRequest) -> None:
        pending.append(incoming)  # answered below, once the connection is gone

    engine.on_request = handler
    lost = asyncio.Event()
    engine.transports.on_connection_lost = lambda conn: lost.set()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(on_client, A_HOST, 0)
    listen_port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await tcp_client(engine)
        via = f"SIP/2.0/TCP {A_HOST}:{listen_port};branch=z9hG4bKreopen"
        writer.write(raw_request("INFO", via=via, call_id="reopen"))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(3):
            assert await reader.read() == b""
            await lost.wait()
        assert engine.transports.connection_count == 0
        assert len(pending) == 1
        pending[0].respond(200)
        async with asyncio.timeout(3):
            data = await received.get()
        response = parse_message(data + b"")
        assert isinstance(response, Response)
        assert (response.status, response.call_id) == (200, "reopen")
    finally:
        server.close()
        await server.wait_closed()


async def test_foreign_and_stray_responses(engines: Any) -> None:
    engine = await engines()
    strays: list[Response] = []
    got = asyncio.Event()

    def on_stray(response: Response, source: Destination) -> None:
        strays.append(response)
        got.set()

    engine.on_stray_response = on_stray
    loop = asyncio.get_running_loop()

    def response(via_host: str, call_id: str) -> bytes:
        return (
            "SIP/2.0 200 OK\r\n"
            f"Via: SIP/2.0/UDP {via_host}:5060;branch=z9hG4bKstray\r\n"
            "From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((A_HOST, 0))
        sock.setblocking(False)
        # RFC 3261 §18.1.2: a top Via that is not ours is dropped.
        await loop.sock_sendto(sock, response("192.0.2.7", "foreign"), (A_HOST, engine.config.port))
        await loop.sock_sendto(sock, response(A_HOST, "stray"), (A_HOST, engine.config.port))
        async with asyncio.timeout(3):
            await got.wait()
    assert [r.call_id for r in strays] == ["stray"]
    assert engine.stats.responses_dropped == 1


async def test_oversized_datagram_answered_513(engines: Any) -> None:
    engine = await engines(max_message_size=2048)
    data = raw_request(
        "MESSAGE",
        via=_udp_via("z9hG4bKbig"),
        extra="Content-Type: text/plain\r\n",
        body=b"y" * 3000,
    )
    response = await _udp_exchange(engine, data)
    assert response.status == 513
    assert engine.transports.stats.oversized == 1


async def test_stop_during_a_dns_lookup_leaves_no_task(engines: Any, fake_dns: Any) -> None:
    fake_dns.silent.add("_sip._udp.hang.test")
    engine = await engines(A_HOST, resolver=_resolver_for(fake_dns, 5.0))
    handle = engine.send_request(new_request("OPTIONS", "sip:x@hang.test", "hang"))
    async with asyncio.timeout(3):
        await fake_dns.queried.wait()  # the query has left: now stop in the middle of it
    await engine.stop()
    assert (await handle).status == 503
    assert asyncio.all_tasks() == {asyncio.current_task()}
