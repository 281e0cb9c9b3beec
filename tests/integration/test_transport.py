"""The transports alone, on real loopback sockets: framing, limits, keep-alives, reuse."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.transport import Transports
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

HOST = "127.0.0.1"


def options(branch: str = "z9hG4bKa1", call_id: str = "c1@x", body: bytes = b"") -> bytes:
    head = (
        "OPTIONS sip:sbc@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.9:5070;branch={branch};rport\r\n"
        "From: <sip:a@127.0.0.9>;tag=f1\r\n"
        "To: <sip:sbc@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        + ("Content-Type: text/plain\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[Request | Response, Destination]] = []
        self.failures: list[tuple[Destination, list[Request | Response], str]] = []
        self._event = asyncio.Event()

    def on_message(self, message: Request | Response, source: Destination) -> None:
        self.messages.append((message, source))
        self._event.set()

    def on_failure(self, dest: Destination, messages: list[Request | Response], why: str) -> None:
        self.failures.append((dest, messages, why))
        self._event.set()

    async def wait_for(self, count: int, limit: float = 5.0) -> None:
        async with asyncio.timeout(limit):
            while len(self.messages) + len(self.failures) < count:
                self._event.clear()
                await self._event.wait()


async def _transports(port: int, **overrides: object) -> tuple[Transports, Recorder]:
    config = TransportConfig(bind=HOST, port=port, **overrides)  # type: ignore[arg-type]
    recorder = Recorder()
    transports = Transports(config, recorder.on_message, recorder.on_failure)
    await transports.start()
    return transports, recorder


@pytest.fixture
async def setup(
    request: pytest.FixtureRequest, free_port_factory: Callable[..., int]
) -> AsyncIterator[tuple[Transports, Recorder]]:
    overrides = getattr(request, "param", {})
    transports, recorder = await _transports(free_port_factory(HOST), **overrides)
    try:
        yield transports, recorder
    finally:
        await transports.stop()


async def _connect(
    transports: Transports, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert transports.tcp_address is not None
    local = None if source is None else (source, 0)
    reader, writer = await asyncio.open_connection(*transports.tcp_address, local_addr=local)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _closed_within(reader: asyncio.StreamReader, limit: float) -> bool:
    """True when the peer closes (EOF or reset) within ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            while True:
                data = await reader.read(4096)
                if not data:
                    return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_message_one_byte_at_a_time_is_parsed(setup: tuple[Transports, Recorder]) -> None:
    transports, recorder = setup
    _, writer = await _connect(transports)
    data = options(body=b"hello")
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        if i % 16 == 0:
            await asyncio.sleep(0.001)  # pacing so the bytes leave as separate segments
    await recorder.wait_for(1)
    message, source = recorder.messages[0]
    assert isinstance(message, Request)
    assert message.method == "OPTIONS"
    assert message.body == b"hello"
    assert source.transport == "tcp"
    assert source.host == HOST
    assert source.port == writer.get_extra_info("sockname")[1]
    assert source.connection_id is not None
    writer.close()


async def test_two_messages_in_one_segment(setup: tuple[Transports, Recorder]) -> None:
    transports, recorder = setup
    _, writer = await _connect(transports)
    writer.write(options(call_id="first") + options(call_id="second", branch="z9hG4bKb2"))
    await writer.drain()
    await recorder.wait_for(2)
    assert [m.call_id for m, _ in recorder.messages] == ["first", "second"]
    writer.close()


@pytest.mark.parametrize("setup", [{"read_timeout": 0.5}], indirect=True)
async def test_slow_sender_closed_at_read_deadline(setup: tuple[Transports, Recorder]) -> None:
    transports, recorder = setup
    reader, writer = await _connect(transports)
    loop = asyncio.get_running_loop()
    data = options()
    started = loop.time()

    async def dribble() -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(dribble())
    closed = await _closed_within(reader, 3.0)
    elapsed = loop.time() - started
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    assert closed
    assert 0.5 <= elapsed < 1.5, elapsed
    assert transports.stats.read_timeouts == 1
    assert recorder.messages == []
    writer.close()


async def test_oversized_message_refused_listener_keeps_serving(
    setup: tuple[Transports, Recorder],
) -> None:
    transports, recorder = setup
    reader, writer = await _connect(transports)
    writer.write(options(body=b"x" * 20000))
    await writer.drain()
    assert await _closed_within(reader, 3.0)
    assert transports.stats.oversized == 1
    # Another connection is served as usual.
    _, writer2 = await _connect(transports)
    writer2.write(options(call_id="after"))
    await writer2.drain()
    await recorder.wait_for(1)
    assert [m.call_id for m, _ in recorder.messages] == ["after"]
    writer.close()
    writer2.close()


async def test_garbage_on_stream_closes_connection(setup: tuple[Transports, Recorder]) -> None:
    transports, _ = setup
    reader, writer = await _connect(transports)
    writer.write(b"NOT SIP AT ALL\r\nfoo\r\n\r\n")
    await writer.drain()
    assert await _closed_within(reader, 3.0)
    assert transports.stats.stream_errors == 1
    writer.close()


async def test_crlf_ping_answered_with_pong(setup: tuple[Transports, Recorder]) -> None:
    transports, _ = setup
    reader, writer = await _connect(transports)
    writer.write(b"\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(3):
        pong = await reader.readexactly(2)
    assert pong == b"\r\n"
    assert transports.stats.pongs_sent == 1
    writer.close()


@pytest.mark.parametrize("setup", [{"max_connections_per_ip": 2}], indirect=True)
async def test_connections_per_address_capped(setup: tuple[Transports, Recorder]) -> None:
    transports, recorder = setup
    kept = [await _connect(transports) for _ in range(2)]
    reader3, writer3 = await _connect(transports)
    assert await _closed_within(reader3, 3.0)
    assert transports.stats.connections_refused == 1
    assert transports.stats.limit_exceeded == {"connections_per_source": 1}
    # The two admitted connections still work, and another source address is admitted.
    kept[1][1].write(options(call_id="ok"))
    await recorder.wait_for(1)
    assert recorder.messages[0][0].call_id == "ok"
    other = await _connect(transports, "127.0.0.2")
    other[1].write(options(call_id="other"))
    await recorder.wait_for(2)
    assert recorder.messages[1][0].call_id == "other"
    assert transports.stats.connections_refused == 1
    for _, w in [*kept, (reader3, writer3), other]:
        w.close()


@pytest.mark.parametrize("setup", [{"max_connections": 1}], indirect=True)
async def test_total_connections_capped(setup: tuple[Transports, Recorder]) -> None:
    transports, _ = setup
    _, writer1 = await _connect(transports)
    reader2, writer2 = await _connect(transports)
    assert await _closed_within(reader2, 3.0)
    assert transports.stats.connections_refused == 1
    assert transports.stats.limit_exceeded == {"connections": 1}
    writer1.close()
    writer2.close()


@pytest.mark.parametrize("setup", [{"idle_timeout": 0.3}], indirect=True)
async def test_idle_connection_closed(setup: tuple[Transports, Recorder]) -> None:
    transports, _ = setup
    loop = asyncio.get_running_loop()
    reader, writer = await _connect(transports)
    started = loop.time()
    assert await _closed_within(reader, 3.0)
    assert 0.3 <= loop.time() - started < 1.3
    assert transports.stats.idle_closes == 1
    writer.close()


async def test_response_goes_back_over_the_same_connection(
    setup: tuple[Transports, Recorder],
) -> None:
    transports, recorder = setup
    reader, writer = await _connect(transports)
    writer.write(options())
    await recorder.wait_for(1)
    request, source = recorder.messages[0]
    response = Response(200, "OK", request.headers)
    transports.send(source, response)
    async with asyncio.timeout(3):
        data = await reader.readuntil(b"\r\n\r\n")
    parsed = parse_message(data)
    assert isinstance(parsed, Response)
    assert parsed.status == 200
    assert parsed.call_id == "c1@x"
    writer.close()


async def test_outbound_connection_reused(
    setup: tuple[Transports, Recorder], free_port_factory: Callable[..., int]
) -> None:
    transports, _ = setup
    accepted: list[asyncio.StreamReader] = []
    got = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)
        got.set()

    port = free_port_factory(HOST)
    server = await asyncio.start_server(on_client, HOST, port)
    try:
        request = parse_message(options())
        dest = Destination("tcp", HOST, port)
        transports.send(dest, request)
        transports.send(dest, request)  # queued behind the pending connect
        async with asyncio.timeout(3):
            await got.wait()
            data = b""
            while data.count(b"OPTIONS ") < 2:
                data += await accepted[0].read(65536)
        transports.send(dest, request)  # over the open connection
        async with asyncio.timeout(3):
            while data.count(b"OPTIONS ") < 3:
                data += await accepted[0].read(65536)
        assert len(accepted) == 1
        assert transports.stats.connections_opened == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_outbound_connection_leaves_from_the_bind_address(
    free_port_factory: Callable[..., int],
) -> None:
    # A peer that filters by source address (Retell's trunk, a PBX's IP restrictions) must
    # see the address sbc is bound to, not the one the kernel picks (127.0.0.1 on loopback).
    bound = "127.0.0.6"
    config = TransportConfig(bind=bound, port=free_port_factory(bound))
    transports = Transports(config, lambda message, source: None, lambda d, m, why: None)
    await transports.start()
    peers: list[tuple[str, int]] = []
    got = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[:2])
        got.set()

    other = "127.0.0.7"
    port = free_port_factory(other)
    server = await asyncio.start_server(on_client, other, port)
    try:
        transports.send(Destination("tcp", other, port), parse_message(options()))
        async with asyncio.timeout(3):
            await got.wait()
        assert peers[0][0] == bound
    finally:
        server.close()
        await server.wait_closed()
        await transports.stop()


async def test_connect_refused_reported(
    setup: tuple[Transports, Recorder], free_port_factory: Callable[..., int]
) -> None:
    transports, recorder = setup
    request = parse_message(options())
    dest = Destination("tcp", HOST, free_port_factory(HOST))  # nothing listens there
    loop = asyncio.get_running_loop()
    started = loop.time()
    transports.send(dest, request)
    await recorder.wait_for(1)
    assert loop.time() - started < 1.0
    failed_dest, messages, why = recorder.failures[0]
    assert failed_dest == dest
    assert messages == [request]
    assert "connect failed" in why


async def test_udp_datagrams_parsed_and_garbage_dropped(
    setup: tuple[Transports, Recorder],
) -> None:
    transports, recorder = setup
    assert transports.udp_address is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, b"garbage\r\n\r\n", transports.udp_address)
        await loop.sock_sendto(sock, b"\r\n\r\n", transports.udp_address)  # keep-alive
        await loop.sock_sendto(sock, options(), transports.udp_address)
        await recorder.wait_for(1)
        message, source = recorder.messages[0]
        assert isinstance(message, Request)
        assert source == Destination("udp", HOST, sock.getsockname()[1])
        assert transports.stats.datagrams_dropped == 1
        assert transports.stats.datagrams_received == 3
        # And a datagram goes out to an address.
        reply = dataclasses.replace(Response(200, "OK", message.headers))
        transports.send(source, reply)
        async with asyncio.timeout(3):
            data = await loop.sock_recv(sock, 65536)
        assert data.startswith(b"SIP/2.0 200 OK\r\n")
    finally:
        sock.close()


async def test_stop_closes_everything(free_port_factory: Callable[..., int]) -> None:
    transports, _ = await _transports(free_port_factory(HOST))
    reader, writer = await _connect(transports)
    await transports.stop()
    assert await _closed_within(reader, 3.0)
    assert transports.connection_count == 0
    writer.close()


@pytest.mark.parametrize("answer_pings", [True, False])
async def test_outbound_keepalive_ping_and_missing_pong(
    answer_pings: bool, free_port_factory: Callable[..., int]
) -> None:
    """RFC 5626 §4.4.1: CRLFCRLF on a quiet outbound connection; no pong closes it."""
    transports, _ = await _transports(
        free_port_factory(HOST), keepalive_interval=0.2, keepalive_timeout=0.3
    )
    pings: list[float] = []
    third_ping = asyncio.Event()
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request's header block
        while True:
            data = await reader.read(4)
            if not data:
                break
            if data == b"\r\n\r\n":
                pings.append(loop.time())
                if len(pings) == 3:
                    third_ping.set()
                if answer_pings:
                    writer.write(b"\r\n")
        closed.set()

    server = await asyncio.start_server(peer, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = loop.time()
        transports.send(Destination("tcp", HOST, port), parse_message(options()))
        if answer_pings:
            async with asyncio.timeout(3):
                await third_ping.wait()
            assert transports.connection_count == 1
            assert transports.stats.pong_timeouts == 0
        else:
            async with asyncio.timeout(3):
                await closed.wait()
            # First ping after 0.2 s of quiet, closed 0.3 s later without a pong.
            assert 0.5 <= loop.time() - started < 1.5
            assert len(pings) == 1
            assert transports.stats.pong_timeouts == 1
    finally:
        await transports.stop()
        server.close()
        await server.wait_closed()


async def test_send_raw_keepalive_over_udp_and_open_connections(
    setup: tuple[Transports, Recorder],
) -> None:
    transports, _ = setup
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.setblocking(False)
        assert transports.send_raw(Destination("udp", HOST, sock.getsockname()[1]), b"\r\n\r\n")
        async with asyncio.timeout(3):
            assert await loop.sock_recv(sock, 100) == b"\r\n\r\n"
    # Over a stream only an open connection is used, never a new one.
    assert not transports.send_raw(Destination("tcp", HOST, 9), b"\r\n\r\n")
    assert transports.stats.connections_opened == 0
    reader, writer = await _connect(transports)
    writer.write(b"\r\n\r\n")
    async with asyncio.timeout(3):
        assert await reader.readexactly(2) == b"\r\n"  # our pong proves the connection is up
    local = writer.get_extra_info("sockname")
    assert transports.send_raw(Destination("tcp", HOST, local[1]), b"\r\n\r\n")
    async with asyncio.timeout(3):
        assert await reader.readexactly(4) == b"\r\n\r\n"
    writer.close()
