"""The NG client and the rtpengine media backend against a real rtpengine daemon.

Each module run starts its own `rtpengine` in userspace (`--table=-1`) on 127.0.0.71 with a free NG
port and a private RTP port range, waits until it answers `ping`, and stops it at the end
(``rtpengine_helpers.running_rtpengine``). Real RTP goes through the ports rtpengine wrote into
the rewritten SDPs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
from rtpengine_helpers import Rtpengine, running_rtpengine

from sbc.media.base import media_address
from sbc.media.rtpengine import (
    NgClient,
    RtpengineBackend,
    RtpengineError,
    RtpengineTimeout,
    rtp_totals,
)
from sbc.sdp.parser import parse_sdp

pytestmark = pytest.mark.integration

RTPENGINE_HOST = "127.0.0.71"
PBX_HOST = "127.0.0.72"
RETELL_HOST = "127.0.0.73"


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def rtpengine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rtpengine]:
    with running_rtpengine(RTPENGINE_HOST, tmp_path_factory.mktemp("rtpengine")) as daemon:
        yield daemon


@pytest.fixture
async def client(rtpengine: Rtpengine) -> AsyncIterator[NgClient]:
    async with NgClient(rtpengine.ng, timeout=1.0, tries=3) as ng:
        yield ng


# --- SDP of the two peers ---------------------------------------------------------------------


def pbx_offer(port: int) -> str:
    """An offer as 3CX writes it (o=3cxPS, several codecs, telephone-event 0-15, ptime 20)."""
    return (
        "v=0\r\n"
        f"o=3cxPS 92274163712 1 IN IP4 {PBX_HOST}\r\n"
        "s=3cxPS Audio call\r\n"
        f"c=IN IP4 {PBX_HOST}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 8 9 18 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:9 G722/8000\r\n"
        "a=rtpmap:18 G729/8000\r\n"
        "a=fmtp:18 annexb=no\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
        "a=ptime:20\r\n"
        "a=sendrecv\r\n"
    )


def retell_answer(port: int) -> str:
    """An answer as Retell's LiveKit SIP stack writes it (exactly one codec plus events)."""
    return (
        "v=0\r\n"
        f"o=LiveKit 1732530000 1732530001 IN IP4 {RETELL_HOST}\r\n"
        "s=LiveKit\r\n"
        f"c=IN IP4 {RETELL_HOST}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
        "a=ptime:20\r\n"
        "a=sendrecv\r\n"
    )


# --- RTP endpoints ----------------------------------------------------------------------------

_RTP = struct.Struct("!BBHII")


def rtp_packet(
    pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool = False
) -> bytes:
    return _RTP.pack(0x80, (0x80 if marker else 0) | pt, seq, ts, ssrc) + payload


class Endpoint(asyncio.DatagramProtocol):
    """A UDP RTP endpoint collecting what it receives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dest)

    async def collect(self, count: int) -> list[bytes]:
        async with asyncio.timeout(3.0):
            return [await self.received.get() for _ in range(count)]


@pytest.fixture
async def endpoints() -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    loop = asyncio.get_running_loop()
    pbx_t, pbx = await loop.create_datagram_endpoint(Endpoint, local_addr=(PBX_HOST, 0))
    retell_t, retell = await loop.create_datagram_endpoint(Endpoint, local_addr=(RETELL_HOST, 0))
    yield pbx, retell
    pbx_t.close()
    retell_t.close()


def media_target(sdp: str) -> tuple[str, int]:
    sd = parse_sdp(sdp)
    audio = sd.audio()
    assert audio is not None
    conn = sd.connection_for(audio)
    assert conn is not None
    return conn.address, audio.port


def voice_stream(ssrc: int, first_seq: int, count: int) -> list[bytes]:
    """`count` PCMU packets of 160 bytes (20 ms each), then a telephone-event for digit 5."""
    packets = [
        rtp_packet(0, (first_seq + i) & 0xFFFF, 160 * i, ssrc, bytes([(i + ssrc) % 256]) * 160)
        for i in range(count)
    ]
    # RFC 4733 §2.3: event 5, end bit clear, volume 10, duration 800; marker set on the first.
    event = struct.pack("!BBH", 5, 10, 800)
    packets.append(rtp_packet(101, (first_seq + count) & 0xFFFF, 160 * count, ssrc, event, True))
    return packets


async def exchange(
    pbx: Endpoint, retell: Endpoint, pbx_sends_to: tuple[str, int], retell_sends_to: tuple[str, int]
) -> None:
    """Send a voice stream each way and check bytes and sequence numbers arrive unchanged.

    Each side sends to the address and port of the SDP it was given: the PBX to the answer
    rewritten for it, Retell to the offer rewritten for it."""
    up = voice_stream(0x11111111, 65530, 20)  # sequence numbers wrap through 0
    down = voice_stream(0x22222222, 100, 20)
    for a, b in zip(up, down, strict=True):
        pbx.send(a, pbx_sends_to)
        retell.send(b, retell_sends_to)
        # Paced (real RTP comes every 20 ms): rtpengine's worker threads may reorder a burst.
        await asyncio.sleep(0.005)
    got_at_retell = await retell.collect(len(up))
    got_at_pbx = await pbx.collect(len(down))
    seqs = [struct.unpack_from("!H", p, 2)[0] for p in got_at_retell]
    assert seqs == [struct.unpack_from("!H", p, 2)[0] for p in up]
    assert got_at_retell == up
    assert got_at_pbx == down
    assert got_at_retell[-1][1] & 0x7F == 101  # the telephone-event passed
    assert got_at_pbx[-1][1] & 0x7F == 101


# --- tests -----------------------------------------------------------------------------------


async def test_ping(client: NgClient) -> None:
    await client.ping()
    assert client.requests_sent == 1


async def test_offer_answer_relays_rtp_both_ways_and_delete_frees_the_call(
    client: NgClient, endpoints: tuple[Endpoint, Endpoint]
) -> None:
    pbx, retell = endpoints
    call_id = "ng-client-1@sbc"
    to_retell_sdp = await client.offer(call_id, "pbx-tag", pbx_offer(pbx.port))
    # rtpengine's address everywhere: nothing of the PBX leg leaks toward Retell.
    assert PBX_HOST not in to_retell_sdp
    assert f"c=IN IP4 {RTPENGINE_HOST}" in to_retell_sdp
    assert f"IN IP4 {RTPENGINE_HOST}" in to_retell_sdp.split("\r\n")[1]  # o= replaced
    assert "telephone-event/8000" in to_retell_sdp
    assert "a=candidate" not in to_retell_sdp
    retell_sends_to = media_target(to_retell_sdp)

    to_pbx_sdp = await client.answer(call_id, "pbx-tag", "retell-tag", retell_answer(retell.port))
    assert RETELL_HOST not in to_pbx_sdp
    pbx_sends_to = media_target(to_pbx_sdp)
    assert pbx_sends_to[0] == retell_sends_to[0] == RTPENGINE_HOST
    assert pbx_sends_to[1] != retell_sends_to[1]

    await exchange(pbx, retell, pbx_sends_to, retell_sends_to)

    query = await client.query(call_id)
    assert set(query["tags"]) == {"pbx-tag", "retell-tag"}
    assert rtp_totals(query).packets == 42

    deleted = await client.delete(call_id, "pbx-tag")
    assert rtp_totals(deleted).packets == 42
    with pytest.raises(RtpengineError, match="Unknown call-id") as info:
        await client.query(call_id)
    assert info.value.status == 503


async def test_error_result_is_raised_with_its_reason(client: NgClient) -> None:
    with pytest.raises(RtpengineError, match="Failed to parse SDP") as info:
        await client.offer("bad-sdp@sbc", "pbx-tag", "this is not SDP")
    assert info.value.command == "offer"
    with pytest.raises(RtpengineError, match="Unknown call-id"):
        await client.answer("never-offered@sbc", "a", "b", retell_answer(4000))
    with pytest.raises(RtpengineError, match="Unrecognized command"):
        await client.request("no such command")


async def test_delete_of_unknown_call_is_a_warning(client: NgClient) -> None:
    reply = await client.delete("never-existed@sbc", "x")
    assert reply["result"] == "ok"
    assert "not found" in reply["warning"]


async def test_silent_peer_times_out_after_every_retransmission() -> None:
    # A port nobody listens on: three sends, then RtpengineTimeout.
    port = _free_udp_port(RTPENGINE_HOST)
    async with NgClient((RTPENGINE_HOST, port), timeout=0.05, tries=3) as ng:
        with pytest.raises(RtpengineTimeout, match="after 3 tries"):
            await ng.ping()
        assert ng.requests_sent == 1
        assert ng.retransmissions == 2


# --- the media backend ------------------------------------------------------------------------


@pytest.fixture
async def backend(rtpengine: Rtpengine) -> AsyncIterator[RtpengineBackend]:
    media = RtpengineBackend(rtpengine.ng, timeout=1.0, tries=3)
    await media.start()
    yield media
    await media.close()


def retell_offer(port: int) -> str:
    """An offer from Retell (a transfer placed back through the bridge by INVITE)."""
    return (
        retell_answer(port)
        .replace("RTP/AVP 0 101", "RTP/AVP 9 0 8 101")
        .replace(
            "a=rtpmap:0 PCMU/8000\r\n",
            "a=rtpmap:9 G722/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n",
        )
    )


def pbx_answer(port: int) -> str:
    return pbx_offer(port).replace("RTP/AVP 0 8 9 18 101", "RTP/AVP 0 101")


@pytest.mark.parametrize("offerer", ["a", "b"])
async def test_backend_bridges_a_call_offered_from_either_side(
    backend: RtpengineBackend, endpoints: tuple[Endpoint, Endpoint], offerer: str
) -> None:
    pbx, retell = endpoints
    call_id = f"backend-{offerer}@sbc"
    session = await backend.allocate(call_id)
    if offerer == "a":
        to_retell = await session.offer("a", parse_sdp(pbx_offer(pbx.port)))
        to_pbx = await session.answer("b", parse_sdp(retell_answer(retell.port)))
        # The codec filter of the session ran before rtpengine: G.729 is not offered on.
        audio = to_retell.audio()
        assert audio is not None
        assert {c.encoding for c in audio.codecs()} == {
            "PCMU",
            "PCMA",
            "G722",
            "telephone-event",
        }
    else:
        to_pbx = await session.offer("b", parse_sdp(retell_offer(retell.port)))
        to_retell = await session.answer("a", parse_sdp(pbx_answer(pbx.port)))
    # The bridge's own o= line on both sides, rtpengine's address and ports in c=/m=.
    for sd in (to_retell, to_pbx):
        assert sd.origin.username == "sbc"
        assert sd.origin.address == RTPENGINE_HOST
    pbx_sends_to = media_address(to_pbx)
    retell_sends_to = media_address(to_retell)
    assert session.local_endpoint("a") == pbx_sends_to
    assert session.local_endpoint("b") == retell_sends_to
    assert pbx_sends_to is not None and retell_sends_to is not None

    await exchange(pbx, retell, pbx_sends_to, retell_sends_to)

    await session.refresh()
    stats = session.stats()
    assert stats["backend"] == "rtpengine"
    assert stats["totals"]["packets"] == 42
    assert stats["sides"]["a"]["rtp"]["packets"] == 21
    assert stats["sides"]["b"]["rtp"]["packets"] == 21
    assert stats["sides"]["a"]["local_port"] == pbx_sends_to[1]
    assert session.last_activity("a") is None  # no poller configured

    await session.close()
    assert session.stats()["totals"]["packets"] == 42  # final counters from the delete reply
    with pytest.raises(RtpengineError, match="Unknown call-id"):
        await backend.client.query(call_id)
    await session.close()  # idempotent
    assert session not in backend.sessions


async def test_pbx_reoffer_moving_its_media_is_followed_with_the_same_ports(
    backend: RtpengineBackend, endpoints: tuple[Endpoint, Endpoint]
) -> None:
    pbx, retell = endpoints
    session = await backend.allocate("reoffer@sbc")
    to_retell = await session.offer("a", parse_sdp(pbx_offer(pbx.port)))
    to_pbx = await session.answer("b", parse_sdp(retell_answer(retell.port)))
    pbx_sends_to, retell_sends_to = media_address(to_pbx), media_address(to_retell)
    assert pbx_sends_to is not None and retell_sends_to is not None
    await exchange(pbx, retell, pbx_sends_to, retell_sends_to)

    # The PBX resumes from a new port (a new phone took the call, say).
    loop = asyncio.get_running_loop()
    moved_t, moved = await loop.create_datagram_endpoint(Endpoint, local_addr=(PBX_HOST, 0))
    try:
        reanswer = await session.reoffer("a", parse_sdp(pbx_offer(moved.port)))
        assert media_address(reanswer) == pbx_sends_to  # same port for the PBX
        await exchange(moved, retell, pbx_sends_to, retell_sends_to)
        assert pbx.received.empty()
    finally:
        moved_t.close()
        await session.close()


async def test_answer_without_offer_is_refused(backend: RtpengineBackend) -> None:
    session = await backend.allocate("no-offer@sbc")
    with pytest.raises(RuntimeError, match="without an offer"):
        await session.answer("b", parse_sdp(retell_answer(4000)))
    await session.close()
    assert "close_error" not in session.stats()


async def test_backend_start_fails_clearly_when_rtpengine_is_absent() -> None:
    port = _free_udp_port(RTPENGINE_HOST)
    media = RtpengineBackend((RTPENGINE_HOST, port), timeout=0.05, tries=2)
    with pytest.raises(RtpengineTimeout, match="after 2 tries"):
        await media.start()
    await media.close()


async def test_poller_reports_media_activity(rtpengine: Rtpengine) -> None:
    media = RtpengineBackend(rtpengine.ng, poll_interval=0.05)
    await media.start()
    try:
        session = await media.allocate("poll@sbc")
        await session.offer("a", parse_sdp(pbx_offer(4000)))
        await session.answer("b", parse_sdp(retell_answer(4002)))
        # Bounded wait for the poller's first query (3 s at most).
        for _ in range(300):
            if session.stats()["sides"]["a"]["rtp"]:
                break
            await asyncio.sleep(0.01)
        assert session.stats()["sides"]["a"]["rtp"] == {"packets": 0, "bytes": 0, "errors": 0}
        activity = session.last_activity("a")
        assert activity is not None
        assert activity <= asyncio.get_running_loop().time()
        await session.close()
    finally:
        await media.close()


async def test_second_offer_from_the_answering_side_keeps_media_flowing(
    backend: RtpengineBackend, endpoints: tuple[Endpoint, Endpoint]
) -> None:
    # A re-INVITE that the call layer forwards (offer from Retell after a PBX-offered call).
    pbx, retell = endpoints
    session = await backend.allocate("second-offer@sbc")
    try:
        to_retell = await session.offer("a", parse_sdp(pbx_offer(pbx.port)))
        to_pbx = await session.answer("b", parse_sdp(retell_answer(retell.port)))
        pbx_sends_to, retell_sends_to = media_address(to_pbx), media_address(to_retell)
        assert pbx_sends_to is not None and retell_sends_to is not None

        re_to_pbx = await session.offer("b", parse_sdp(retell_offer(retell.port)))
        re_to_retell = await session.answer("a", parse_sdp(pbx_answer(pbx.port)))
        assert media_address(re_to_pbx) == pbx_sends_to
        assert media_address(re_to_retell) == retell_sends_to
        # Side a's (the PBX's) o= line is the same session, one version up (RFC 3264 §8).
        assert re_to_pbx.origin.sess_id == to_pbx.origin.sess_id
        assert re_to_pbx.origin.sess_version >= to_pbx.origin.sess_version
        await exchange(pbx, retell, pbx_sends_to, retell_sends_to)
    finally:
        await session.close()
