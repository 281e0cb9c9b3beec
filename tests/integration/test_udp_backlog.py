"""Retransmissions over UDP when the answer is already in sbc's socket, unread.

uvloop (libuv), which ``sbc run`` uses, reads at most 32 datagrams of a socket per round of the
loop, then runs the timers that are due. When the loop fell behind (a stall longer than T1
under load, a long collection) with more than that queued, the answer to a request sbc sent
may still wait unread in its own socket when the request's retransmission timer fires:
sending the request again then only makes the peer answer again, two more datagrams for a
loop already behind. The engine reads first (at most T1 longer); a peer that is really silent
still gets its retransmissions.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import uvloop
from peers import free_port

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri

SBC_HOST = "127.0.0.1"
PEER_HOST = "127.0.0.2"
T1 = 0.2
BACKLOG = 200  # datagrams ahead of the answer: several rounds of the loop (32 a round)


def options(call_id: str) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:sbc@127.0.0.1>;tag=a1"),
            ("To", "<sip:x@127.0.0.2>"),
            ("Call-ID", call_id),
            ("CSeq", "1 OPTIONS"),
        ]
    )
    return Request("OPTIONS", parse_uri("sip:x@127.0.0.2"), headers)


def ok_for(request: bytes) -> bytes:
    """200 OK copying the request's Via, From, To, Call-ID and CSeq (as a SIP peer answers)."""
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    copied = [
        line
        for line in head.split("\r\n")[1:]
        if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq")
    ]
    return ("SIP/2.0 200 OK\r\n" + "\r\n".join(copied) + "\r\nContent-Length: 0\r\n\r\n").encode()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


async def receive(sock: socket.socket, limit: float = 5.0) -> bytes:
    """The next datagram on a non-blocking socket (uvloop has no sock_recvfrom)."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            assert asyncio.get_running_loop().time() < deadline, "nothing received"
            await asyncio.sleep(0.002)


async def start_engine(**overrides: Any) -> SipEngine:
    engine = SipEngine(TransportConfig(bind=SBC_HOST, port=free_port(SBC_HOST), **overrides))
    await engine.start()
    return engine


async def answered_during_a_stall() -> tuple[int, list[bytes], int, int]:
    engine = await start_engine(t1=T1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind((PEER_HOST, 0))
            peer.setblocking(False)
            dest = Destination("udp", PEER_HOST, peer.getsockname()[1])
            handle = engine.send_request(options("stall"), dest)
            request = await receive(peer)
            assert engine.transports.udp_address is not None
            # Other traffic first (CRLF keep-alives: nothing to answer), then the 200, while
            # the loop is busy for 3 x T1 (as under load): when it comes back, Timer E is due
            # and the 200 waits unread behind more datagrams than one round reads.
            for _ in range(BACKLOG):
                peer.sendto(b"\r\n\r\n", engine.transports.udp_address)
            peer.sendto(ok_for(request), engine.transports.udp_address)
            time.sleep(3 * T1)  # noqa: ASYNC251 - blocking the loop is the point: a stall
            response = await asyncio.wait_for(handle, 5.0)
            # Longer than Timer E's next interval: a retransmission would have arrived.
            await asyncio.sleep(3 * T1)
            again = drain(peer)
        stats = engine.stats
        return response.status, again, stats.retransmissions, stats.timers_deferred
    finally:
        await engine.stop()


def test_no_retransmission_when_the_answer_waits_unread_after_a_stall() -> None:
    status, again, retransmissions, deferred = uvloop.run(answered_during_a_stall())
    assert status == 200
    assert again == []  # the peer got the OPTIONS once
    assert retransmissions == 0
    assert deferred >= 1


async def silent_peer_with_input_always_waiting() -> tuple[int, int, int, float]:
    loop = asyncio.get_running_loop()
    t1 = 0.05
    engine = await start_engine(t1=t1)
    # As under a sustained overload: the socket never empties. Reading first must not hold
    # retransmissions back for longer than T1 each time.
    engine.transports.udp_input_waiting = lambda: True  # type: ignore[method-assign]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind((PEER_HOST, 0))
            silent.setblocking(False)
            dest = Destination("udp", PEER_HOST, silent.getsockname()[1])
            started = loop.time()
            response = await engine.send_request(options("silent"), dest)
            elapsed = loop.time() - started
            received = len(drain(silent))
        return response.status, received, engine.stats.retransmissions, elapsed
    finally:
        await engine.stop()


def test_a_silent_peer_still_gets_retransmissions_when_input_never_stops() -> None:
    status, received, retransmissions, elapsed = uvloop.run(silent_peer_with_input_always_waiting())
    assert status == 408
    # RFC 3261 Table 4: Timer F = 64 x T1 (3.2 s), reached at most T1 late.
    assert 64 * 0.05 - 0.01 <= elapsed < 64 * 0.05 + 1.0, elapsed
    # Timer E at 50, 100, 200, 400 ms, then every T2 (capped: 4 s > F here): at least 5 sends
    # in 3.2 s even when each waits up to T1 for input that never ends.
    assert received >= 4
    assert retransmissions == received - 1
