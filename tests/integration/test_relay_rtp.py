"""The built-in RTP relay with real UDP sockets on loopback.

A fake PBX (127.0.0.2) and a fake Retell (127.0.0.3) exchange RTP and RTCP through the relay
(127.0.0.1). Every wait is on a packet arriving (bounded by a timeout), never a sleep, except the
one test that must let the learning window pass, which waits on the loop clock for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import pytest

from sbc.media.ports import PortPool, PortsExhausted
from sbc.media.relay import RelayBackend, RelaySession
from sbc.media.rtp import RtpHeader, build_rtp, dtmf_packets, parse_rtp
from sbc.sdp.model import SessionDescription
from sbc.sdp.parser import parse_sdp

pytestmark = pytest.mark.integration

RELAY = "127.0.0.1"
PBX = "127.0.0.2"
RETELL = "127.0.0.3"
TIMEOUT = 2.0


class Endpoint(asyncio.DatagramProtocol):
    """A fake peer's UDP socket: every datagram received goes to a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport does not subclass DatagramTransport: cast, no check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def receive(self, count: int) -> list[tuple[bytes, tuple[str, int]]]:
        return [await asyncio.wait_for(self.queue.get(), TIMEOUT) for _ in range(count)]


async def open_endpoint(host: str, port: int = 0) -> Endpoint:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Endpoint, local_addr=(host, port))
    return protocol


def close_endpoints(*endpoints: Endpoint) -> None:
    for endpoint in endpoints:
        if endpoint.transport is not None:
            endpoint.transport.close()


@pytest.fixture
def pool() -> PortPool:
    # A per-process slice of the high ports, so parallel test runs rarely meet; a port held by
    # someone else is skipped by bind_pair anyway.
    base = 42000 + (os.getpid() % 400) * 40
    return PortPool(base, base + 39)


def sdp(owner: str, address: str, port: int, extra: str = "") -> SessionDescription:
    return parse_sdp(
        f"v=0\r\no={owner} 1 1 IN IP4 {address}\r\ns=call\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 9 0 101\r\na=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\n"
        f"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n{extra}"
    )


@dataclass
class Call:
    session: RelaySession
    pbx: Endpoint
    retell: Endpoint
    to_retell: SessionDescription  # the offer the relay gives Retell
    to_pbx: SessionDescription  # the answer the relay gives the PBX

    @property
    def pbx_target(self) -> tuple[str, int]:
        """Where the PBX sends RTP: the relay's pbx-facing socket, from the answer it got."""
        return RELAY, self.to_pbx.media[0].port

    @property
    def retell_target(self) -> tuple[str, int]:
        return RELAY, self.to_retell.media[0].port


@pytest.fixture
async def call(pool: PortPool) -> AsyncIterator[Call]:
    backend = RelayBackend(RELAY, RELAY, pool, learning_window=0.2)
    session = await backend.allocate("call-1")
    pbx = await open_endpoint(PBX)
    retell = await open_endpoint(RETELL)
    to_retell = await session.offer("a", sdp("3cxPS", PBX, pbx.port))
    to_pbx = await session.answer("b", sdp("-", RETELL, retell.port))
    yield Call(session, pbx, retell, to_retell, to_pbx)
    close_endpoints(pbx, retell)
    await backend.close()
    assert pool.in_use == 0


def packets(count: int, first_seq: int, ssrc: int) -> list[bytes]:
    return [
        build_rtp(RtpHeader(9, (first_seq + i) & 0xFFFF, i * 160, ssrc), bytes([i % 256]) * 160)
        for i in range(count)
    ]


async def test_sdp_names_the_relay_sockets_facing_each_side(call: Call) -> None:
    session = call.session
    assert call.to_retell.connection is not None
    assert call.to_retell.connection.address == RELAY
    assert call.to_retell.media[0].port == session.port("b")
    assert call.to_pbx.media[0].port == session.port("a")
    assert call.to_retell.origin.username == "sbc"
    assert session.local_endpoint("a") == (RELAY, session.port("a"))
    assert {session.port("a") % 2, session.port("b") % 2} == {0}


async def test_rtp_both_directions_bytes_and_sequences_preserved(call: Call) -> None:
    up = packets(50, 65500, ssrc=0x11111111)  # crosses the 16-bit wrap
    down = packets(50, 7, ssrc=0x22222222)
    for data in up:
        call.pbx.send(data, call.pbx_target)
    received_up = await call.retell.receive(50)
    for data in down:
        call.retell.send(data, call.retell_target)
    received_down = await call.pbx.receive(50)

    assert [d for d, _ in received_up] == up
    assert [d for d, _ in received_down] == down
    assert {a for _, a in received_up} == {call.retell_target}  # from the retell-facing socket
    assert {a for _, a in received_down} == {call.pbx_target}
    assert [parse_rtp(d).header.sequence for d, _ in received_up] == [
        (65500 + i) & 0xFFFF for i in range(50)
    ]
    stats = call.session.stats()["sides"]
    assert stats["a"]["rtp"]["packets"] == 50
    assert stats["a"]["rtp"]["bytes"] == sum(len(p) for p in up)
    assert stats["a"]["rtp"]["seq_gaps"] == 0
    assert stats["b"]["rtp"]["packets"] == 50
    loop = asyncio.get_running_loop()
    activity = call.session.last_activity("a")
    assert activity is not None and activity <= loop.time()


async def test_sequence_gaps_are_counted(call: Call) -> None:
    sent = [p for i, p in enumerate(packets(10, 100, ssrc=5)) if i not in (3, 4, 7)]
    for data in sent:
        call.pbx.send(data, call.pbx_target)
    await call.retell.receive(len(sent))
    rtp = call.session.stats()["sides"]["a"]["rtp"]
    assert (rtp["seq_gaps"], rtp["lost"]) == (2, 3)


async def test_telephone_event_packets_pass_untouched(call: Call) -> None:
    dtmf = dtmf_packets("5", payload_type=101, ssrc=77, first_sequence=10, timestamp=4000)
    for data in dtmf:
        call.retell.send(data, call.retell_target)
    received = await call.pbx.receive(len(dtmf))
    assert [d for d, _ in received] == dtmf


async def test_rtcp_is_relayed_on_the_odd_ports(pool: PortPool) -> None:
    backend = RelayBackend(RELAY, RELAY, pool, learning_window=0.2)
    session = await backend.allocate("rtcp")
    pbx, pbx_rtcp = await open_endpoint(PBX), await open_endpoint(PBX)
    retell, retell_rtcp = await open_endpoint(RETELL), await open_endpoint(RETELL)
    try:
        # RFC 3605 a=rtcp tells where each side wants its RTCP.
        to_retell = await session.offer(
            "a", sdp("3cxPS", PBX, pbx.port, f"a=rtcp:{pbx_rtcp.port}\r\n")
        )
        to_pbx = await session.answer(
            "b",
            sdp("-", RETELL, retell.port, f"a=rtcp:{retell_rtcp.port} IN IP4 {RETELL}\r\n"),
        )
        assert to_retell.media[0].attribute("rtcp") == f"{session.port('b') + 1}"
        assert to_pbx.media[0].attribute("rtcp") == f"{session.port('a') + 1} IN IP4 {RELAY}"
        report = bytes([0x80, 200, 0, 6]) + os.urandom(24)
        pbx_rtcp.send(report, (RELAY, session.port("a") + 1))
        ((data, source),) = await retell_rtcp.receive(1)
        assert (data, source) == (report, (RELAY, session.port("b") + 1))
        reply = bytes([0x80, 201, 0, 1]) + os.urandom(4)
        retell_rtcp.send(reply, (RELAY, session.port("b") + 1))
        ((data, source),) = await pbx_rtcp.receive(1)
        assert (data, source) == (reply, (RELAY, session.port("a") + 1))
        assert session.stats()["sides"]["a"]["rtcp"]["packets"] == 1
        assert retell.queue.empty() and pbx.queue.empty()
    finally:
        close_endpoints(pbx, pbx_rtcp, retell, retell_rtcp)
        await backend.close()


async def test_nat_source_is_latched(pool: PortPool) -> None:
    backend = RelayBackend(RELAY, RELAY, pool, learning_window=0.2)
    session = await backend.allocate("nat")
    private = await open_endpoint(PBX)  # what the SDP names; never sends
    public = await open_endpoint(PBX)  # where the packets really come from
    retell = await open_endpoint(RETELL)
    try:
        await session.offer("a", sdp("3cxPS", PBX, private.port))
        await session.answer("b", sdp("-", RETELL, retell.port))
        first = packets(1, 1, ssrc=1)[0]
        public.send(first, (RELAY, session.port("a")))
        assert (await retell.receive(1))[0][0] == first
        back = packets(1, 9, ssrc=2)[0]
        retell.send(back, (RELAY, session.port("b")))
        assert (await public.receive(1))[0][0] == back
        assert private.queue.empty()
        assert session.stats()["sides"]["a"]["rtp"]["remote"] == f"{PBX}:{public.port}"
    finally:
        close_endpoints(private, public, retell)
        await backend.close()


async def test_after_the_learning_window_other_sources_are_dropped(call: Call) -> None:
    loop = asyncio.get_running_loop()
    intruder = await open_endpoint(PBX)
    try:
        call.pbx.send(packets(1, 1, ssrc=1)[0], call.pbx_target)
        await call.retell.receive(1)
        learnt_at = loop.time()
        # The only wait on time itself: let the 0.2 s window pass on the loop clock.
        await asyncio.sleep(learnt_at + 0.25 - loop.time())
        assert loop.time() > learnt_at + 0.2
        bleed = build_rtp(RtpHeader(9, 2, 320, 666), b"bleed")
        intruder.send(bleed, call.pbx_target)
        legit = packets(2, 2, ssrc=1)[1]
        call.pbx.send(legit, call.pbx_target)
        # Loopback delivers in send order into the relay socket: once the legit packet is out,
        # the intruder's was already handled.
        ((data, _),) = await call.retell.receive(1)
        assert data == legit
        rtp = call.session.stats()["sides"]["a"]["rtp"]
        assert rtp["dropped"] == 1
        assert rtp["remote"] == f"{PBX}:{call.pbx.port}"
        assert call.retell.queue.empty()
    finally:
        close_endpoints(intruder)


async def test_a_stray_packet_after_the_window_locks_the_socket_and_a_new_sdp_unlocks_it(
    call: Call,
) -> None:
    """After the first stray packet past the window the socket is connected to the latched
    source: further strays never reach the relay (the kernel drops them); a new SDP address
    (re-INVITE) opens a new window in which a NAT source may be latched again."""
    loop = asyncio.get_running_loop()
    intruder = await open_endpoint(PBX)
    natted = await open_endpoint(PBX)
    try:
        call.pbx.send(packets(1, 1, ssrc=1)[0], call.pbx_target)
        await call.retell.receive(1)
        learnt_at = loop.time()
        # The only wait on time itself: let the 0.2 s window pass on the loop clock.
        await asyncio.sleep(learnt_at + 0.25 - loop.time())
        facing_pbx = call.session.rtp["a"]
        assert not facing_pbx.locked
        intruder.send(b"stray", call.pbx_target)
        legit = packets(3, 2, ssrc=1)
        call.pbx.send(legit[0], call.pbx_target)
        assert (await call.retell.receive(1))[0][0] == legit[0]
        assert facing_pbx.locked
        assert facing_pbx.dropped == 1
        for _ in range(20):
            intruder.send(b"stray", call.pbx_target)
        call.pbx.send(legit[1], call.pbx_target)
        assert (await call.retell.receive(1))[0][0] == legit[1]
        assert facing_pbx.dropped == 1  # the kernel dropped the other twenty
        # Retell's side still sends to the latched PBX address through the locked socket.
        back = packets(1, 9, ssrc=7)[0]
        call.retell.send(back, call.retell_target)
        assert (await call.pbx.receive(1))[0][0] == back
        # A re-INVITE names a new address: unlocked, and a NAT source is latched in the window.
        moved = await call.session.reoffer("a", sdp("3cxPS", "10.9.9.9", 4000))
        assert moved.media[0].port == call.pbx_target[1]
        assert not facing_pbx.locked
        natted.send(legit[2], call.pbx_target)
        assert (await call.retell.receive(1))[0][0] == legit[2]
        assert facing_pbx.remote == (PBX, natted.port)
    finally:
        close_endpoints(intruder, natted)


async def test_reoffer_keeps_the_relay_address_and_relearns_a_new_pbx_address(call: Call) -> None:
    moved = await open_endpoint(PBX)
    try:
        hold = sdp("3cxPS", PBX, moved.port, "a=sendonly\r\n")
        reply = await call.session.reoffer("a", hold)
        assert reply.direction(reply.media[0]) == "recvonly"
        assert reply.connection is not None
        assert (reply.connection.address, reply.media[0].port) == call.pbx_target
        assert reply.origin.sess_id == call.to_pbx.origin.sess_id
        assert reply.origin.sess_version == call.to_pbx.origin.sess_version + 1
        # On hold (we answered recvonly): no RTP toward the PBX, the PBX's RTP still goes on.
        held = packets(1, 1, ssrc=3)[0]
        call.retell.send(held, call.retell_target)
        moh = packets(1, 1, ssrc=4)[0]
        moved.send(moh, call.pbx_target)
        assert (await call.retell.receive(1))[0][0] == moh
        assert call.session.stats()["sides"]["b"]["rtp"]["muted"] == 1
        resumed = await call.session.reoffer("a", sdp("3cxPS", PBX, moved.port))
        assert resumed.direction(resumed.media[0]) == "sendrecv"
        data = packets(2, 1, ssrc=3)[1]
        call.retell.send(data, call.retell_target)
        assert (await moved.receive(1))[0][0] == data  # sent to the new SDP address
        assert moved.queue.empty()
    finally:
        close_endpoints(moved)


async def test_close_releases_ports_and_they_can_be_bound_again(pool: PortPool) -> None:
    backend = RelayBackend(RELAY, RELAY, pool)
    session = await backend.allocate("c")
    ports = [session.port("a"), session.port("b")]
    assert pool.in_use == 2
    await session.close()
    await session.close()  # idempotent
    assert pool.in_use == 0
    assert backend.sessions == set()
    with pytest.raises(RuntimeError):
        await session.offer("a", sdp("3cxPS", PBX, 4000))
    with pytest.raises(RuntimeError):
        await session.answer("b", sdp("-", RETELL, 4000))
    for port in ports:
        for p in (port, port + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((RELAY, p))


async def test_thousand_allocate_close_cycles_leave_no_port_in_use(pool: PortPool) -> None:
    backend = RelayBackend(RELAY, RELAY, pool)
    for i in range(1000):
        session = await backend.allocate(f"call-{i}")
        await session.close()
    assert pool.in_use == 0
    assert pool.available == pool.capacity
    assert backend.sessions == set()


async def test_bind_pair_skips_a_port_held_by_another_socket(pool: PortPool) -> None:
    held_port = pool.allocate()
    pool.release(held_port)
    # the pool hands the others out first now; make the held one next by cycling the rest
    for _ in range(pool.available - 1):
        pool.release(pool.allocate())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((RELAY, held_port + 1))  # someone else holds the RTCP half
        pair = pool.bind_pair(RELAY)
        try:
            assert pair.port != held_port
            assert pool.in_use == 1
            assert pair.rtp.getsockname()[1] == pair.port
            assert pair.rtcp.getsockname()[1] == pair.port + 1
        finally:
            pair.close()
            pool.release(pair.port)


async def test_pool_exhaustion_fails_allocate_and_leaks_nothing() -> None:
    base = 41000 + (os.getpid() % 400) * 2
    pool = PortPool(base, base + 1)  # one pair: a call needs two
    backend = RelayBackend(RELAY, RELAY, pool)
    with pytest.raises(PortsExhausted):
        await backend.allocate("c")
    assert pool.in_use == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((RELAY, base))
        with pytest.raises(PortsExhausted):
            pool.bind_pair(RELAY)
    assert pool.in_use == 0


async def test_allocate_failing_midway_closes_sockets_and_releases_ports(
    pool: PortPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    real = loop.create_datagram_endpoint
    calls = 0

    async def flaky(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("simulated")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "create_datagram_endpoint", flaky)
    backend = RelayBackend(RELAY, RELAY, pool)
    with pytest.raises(OSError, match="simulated"):
        await backend.allocate("c")
    monkeypatch.undo()
    assert pool.in_use == 0
    assert backend.sessions == set()
    session = await backend.allocate("again")  # every port is bindable again
    await backend.close()
    assert session.closed
    assert pool.in_use == 0


def test_bind_pair_survives_socket_creation_failure(
    pool: PortPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.socket
    made: list[socket.socket] = []

    def second_fails(*args: object, **kwargs: object) -> socket.socket:
        if len(made) % 2 == 1:
            made.append(made[-1])
            raise OSError("EMFILE")
        sock = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(sock)
        return sock

    monkeypatch.setattr(socket, "socket", second_fails)
    with pytest.raises(PortsExhausted):
        pool.bind_pair(RELAY)
    monkeypatch.undo()
    assert pool.in_use == 0
    assert all(s.fileno() == -1 for s in made)  # every socket that was made got closed
