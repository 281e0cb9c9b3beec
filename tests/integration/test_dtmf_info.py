"""SIP INFO DTMF becomes RFC 4733 events toward Retell: the relay's injection on real sockets.

A fake PBX (127.0.0.82) streams audio through a RelayBackend session (127.0.0.81) to a fake
Retell (127.0.0.83) while the session injects a digit toward Retell; Retell's socket must see one
RTP stream: the audio's SSRC, the negotiated telephone-event payload type, sequence numbers that
go up by exactly one from packet to packet across audio and events. Every wait is on packets
arriving, bounded by a timeout; the only sleeps pace the fake PBX's audio (20 ms, as a phone).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast

import pytest
from bridge_helpers import demo_pbx, quick_sip
from peers import free_port
from rtpengine_helpers import running_rtpengine

from sbc.demo.pbx import PbxStandIn
from sbc.demo.retell import RetellStandIn
from sbc.media.base import media_address
from sbc.media.ports import PortPool
from sbc.media.relay import RelayBackend, RelaySession
from sbc.media.rtp import (
    RtpHeader,
    RtpPacket,
    build_rtp,
    parse_rtp,
    parse_telephone_event,
)
from sbc.media.rtpengine import RtpengineBackend, RtpengineError
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    RetellSettings,
    Settings,
)
from sbc.sdp.model import SessionDescription
from sbc.sdp.parser import parse_sdp
from sbc.sip.ids import new_branch

pytestmark = pytest.mark.integration

RELAY = "127.0.0.81"
PBX = "127.0.0.82"
RETELL = "127.0.0.83"
TIMEOUT = 3.0
AUDIO_SSRC = 0x5EED0001
EVENT_PT = 98  # Retell's number for telephone-event; the PBX uses 101


class Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    async def receive(self, count: int) -> list[RtpPacket]:
        return [parse_rtp(await asyncio.wait_for(self.queue.get(), TIMEOUT)) for _ in range(count)]


async def open_endpoint(host: str) -> Endpoint:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Endpoint, local_addr=(host, 0))
    return protocol


def sdp(address: str, port: int, event_pt: int | None) -> SessionDescription:
    formats = "0" if event_pt is None else f"0 {event_pt}"
    events = "" if event_pt is None else f"a=rtpmap:{event_pt} telephone-event/8000\r\n"
    return parse_sdp(
        f"v=0\r\no=- 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {formats}\r\na=rtpmap:0 PCMU/8000\r\n{events}a=ptime:20\r\n"
    )


@dataclass
class Call:
    session: RelaySession
    pbx: Endpoint
    retell: Endpoint
    pbx_target: tuple[str, int]

    def send_audio(self, seq: int, timestamp: int) -> None:
        assert self.pbx.transport is not None
        packet = build_rtp(RtpHeader(0, seq & 0xFFFF, timestamp, AUDIO_SSRC), b"\xff" * 160)
        self.pbx.transport.sendto(packet, self.pbx_target)


@pytest.fixture
def pool() -> PortPool:
    base = 52000 + (os.getpid() % 300) * 20
    return PortPool(base, base + 19)


async def open_call(pool: PortPool, retell_event_pt: int | None) -> tuple[RelayBackend, Call]:
    backend = RelayBackend(RELAY, RELAY, pool, learning_window=0.2)
    session = await backend.allocate("dtmf-call")
    pbx = await open_endpoint(PBX)
    retell = await open_endpoint(RETELL)
    await session.offer("a", sdp(PBX, pbx.port, 101))
    to_pbx = await session.answer("b", sdp(RETELL, retell.port, retell_event_pt))
    return backend, Call(session, pbx, retell, (RELAY, to_pbx.media[0].port))


@pytest.fixture
async def call(pool: PortPool) -> AsyncIterator[Call]:
    backend, opened = await open_call(pool, EVENT_PT)
    yield opened
    for endpoint in (opened.pbx, opened.retell):
        assert endpoint.transport is not None
        endpoint.transport.close()
    await backend.close()
    assert pool.in_use == 0


def assert_one_stream(packets: list[RtpPacket]) -> None:
    """One SSRC, and sequence numbers up by exactly one each packet (no gap, no duplicate)."""
    assert {p.header.ssrc for p in packets} == {AUDIO_SSRC}
    sequences = [p.header.sequence for p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))


async def test_digit_is_injected_into_the_audio_stream_toward_retell(call: Call) -> None:
    first_seq = 65530  # the output numbering wraps during the test
    for i in range(3):
        call.send_audio(first_seq + i, i * 160)
    before = await call.retell.receive(3)
    assert [p.header.sequence for p in before] == [65530, 65531, 65532]  # forwarded as is

    assert await call.session.send_dtmf("b", "5", 160)
    # The PBX keeps talking while the event plays (RFC 4733 §2.5.1.6): 12 more audio packets.
    for i in range(3, 15):
        call.send_audio(first_seq + i, i * 160)
        await asyncio.sleep(0.02)  # pacing the fake phone's audio, not synchronisation
    # 160 ms at 20 ms: 8 packets with growing durations, the last of them sent 3 times.
    after = await call.retell.receive(12 + 10)
    stream = before + after
    assert_one_stream(stream)

    events = [p for p in stream if p.header.payload_type == EVENT_PT]
    audio = [p for p in stream if p.header.payload_type == 0]
    assert (len(events), len(audio)) == (10, 15)
    payloads = [parse_telephone_event(p.payload) for p in events]
    assert {e.event for e in payloads} == {5}
    assert [e.duration for e in payloads] == [160 * n for n in range(1, 9)] + [1280, 1280]
    assert [e.end for e in payloads] == [False] * 7 + [True] * 3
    assert [p.header.marker for p in events] == [True] + [False] * 9
    # RFC 4733 §2.5.1.2: every packet carries the start time: the audio packet after the last
    # one forwarded before the event started.
    start = stream.index(events[0])
    assert {p.header.timestamp for p in events} == {stream[start - 1].header.timestamp + 160}
    # Audio bytes other than the sequence number are unchanged.
    assert [p.header.timestamp for p in audio] == [i * 160 for i in range(15)]
    assert all(p.payload == b"\xff" * 160 for p in audio)
    counters = call.session.stats()["sides"]["b"]
    assert (counters["dtmf_events"], counters["rtp"]["injected"]) == (1, 10)


async def test_digits_queue_and_get_distinct_start_times_without_audio(call: Call) -> None:
    assert await call.session.send_dtmf("b", "#", 40)  # 40 ms: 2 packets + 2 repeats
    assert await call.session.send_dtmf("b", "1", 10)  # clamped up to 40 ms
    packets = await call.retell.receive(8)
    sequences = [p.header.sequence for p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))
    assert len({p.header.ssrc for p in packets}) == 1  # no audio yet: an SSRC of the bridge's
    events = [parse_telephone_event(p.payload) for p in packets]
    assert [e.event for e in events] == [11] * 4 + [1] * 4  # the second waits for the first
    assert [p.header.marker for p in packets] == [True, False, False, False] * 2
    first, second = packets[0].header.timestamp, packets[4].header.timestamp
    assert (second - first) & 0xFFFFFFFF >= 320  # starts after the first event's 320 ticks


async def test_no_injection_without_telephone_event_a_digit_or_an_open_session(
    pool: PortPool,
) -> None:
    backend, opened = await open_call(pool, retell_event_pt=None)
    try:
        assert not await opened.session.send_dtmf("b", "5", 160)  # Retell took no events
        assert not await opened.session.send_dtmf("a", "X", 160)  # not a DTMF digit
        assert opened.session.stats()["sides"]["b"]["dtmf_refused"] == 1
        opened.send_audio(1, 0)
        [packet] = await opened.retell.receive(1)
        assert packet.header.sequence == 1 and opened.retell.queue.empty()
    finally:
        for endpoint in (opened.pbx, opened.retell):
            assert endpoint.transport is not None
            endpoint.transport.close()
        await backend.close()
    assert not await opened.session.send_dtmf("a", "5", 160)  # closed


# -- end to end: 3CX's INFO through a real bridge to Retell's RTP --------------------------------

SBC, PBX_SIP, RETELL_SIP = "127.0.0.84", "127.0.0.85", "127.0.0.86"
EXTENSION = "1000"


def bridge_settings() -> Settings:
    rtp_min = free_port(SBC) & ~1
    return Settings(
        sip=quick_sip(SBC),
        pbx=demo_pbx(PBX_SIP, EXTENSION),
        retell=RetellSettings(
            host=RETELL_SIP, port=free_port(RETELL_SIP), transport="tcp", number="+14155550100"
        ),
        calls=CallsSettings(country_code="31"),
        media=MediaSettings(mode="relay", rtp_port_min=rtp_min, rtp_port_max=rtp_min + 19),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
    )


async def test_info_from_3cx_reaches_retell_as_rfc4733_events() -> None:
    settings = bridge_settings()
    pbx = PbxStandIn(
        PBX_SIP, settings.pbx.port, extension=EXTENSION, auth_id="demo1000", password="secret"
    )
    retell = RetellStandIn(RETELL_SIP, settings.retell.port, ring=0.05)
    service = Service(settings)
    await pbx.start()
    await retell.start()
    try:
        await service.start()
        async with asyncio.timeout(10):
            await pbx.registered.wait()
            call = await pbx.call()
            assert call.final is not None and call.final.status == 200, call.statuses
            retell_call = retell.calls[next(iter(retell.calls))]
            await retell_call.acked.wait()
            heard = retell_call.rtp
            await heard.wait_received(5)  # 3CX's audio flows through the relay

            assert call.dialog is not None
            info = call.dialog.create_request(
                "INFO",
                via=pbx.engine.make_via("udp"),
                branch=new_branch(secrets.token_bytes(12)),
                headers=(("Content-Type", "application/dtmf-relay"),),
                body=b"Signal=7\r\nDuration=160\r\n",
            )
            answer = await pbx.engine.send_request(info)
            assert answer.status == 200
            while len([p for p in heard.events_received() if p.payload[1] & 0x80]) < 3:
                await heard.wait_received(len(heard.received) + 1)
            assert await pbx.hang_up(call) == 200
            await retell_call.ended.wait()
    finally:
        await service.stop()
        await retell.stop()
        await pbx.stop()

    events = heard.events_received()
    payloads = [parse_telephone_event(p.payload) for p in events]
    assert {e.event for e in payloads} == {7}
    assert len(events) == 10 and [e.end for e in payloads].count(True) == 3
    assert [p.header.marker for p in events] == [True] + [False] * 9
    # One stream from 3CX's SSRC, numbered without gap or duplicate across audio and events.
    assert {p.header.ssrc for p in heard.received} == {call.rtp.ssrc}
    sequences = [p.header.sequence for p in heard.received]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))


# -- rtpengine: NG `play DTMF` (needs `inject DTMF` in offer and answer) -------------------------

ENGINE, ENGINE_PBX, ENGINE_RETELL = "127.0.0.87", "127.0.0.88", "127.0.0.89"


@pytest.fixture(scope="module")
def rtpengine_ng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    with running_rtpengine(ENGINE, tmp_path_factory.mktemp("rtpengine"), ports=40) as engine:
        yield engine.ng


async def start_backend(ng: tuple[str, int], *, inject_dtmf: bool) -> RtpengineBackend:
    backend = RtpengineBackend(ng, timeout=0.2, tries=10, inject_dtmf=inject_dtmf)
    async with asyncio.timeout(10):
        while True:  # the daemon may still be starting: bounded by the timeout
            try:
                await backend.start()
                return backend
            except RtpengineError:
                backend.client.close()
                backend = RtpengineBackend(ng, timeout=0.2, tries=10, inject_dtmf=inject_dtmf)


async def test_rtpengine_plays_the_digit_toward_retell(rtpengine_ng: tuple[str, int]) -> None:
    backend = await start_backend(rtpengine_ng, inject_dtmf=True)
    pbx = await open_endpoint(ENGINE_PBX)
    retell = await open_endpoint(ENGINE_RETELL)
    session = await backend.allocate("rtpengine-dtmf@sbc")
    try:
        to_retell = await session.offer("a", sdp(ENGINE_PBX, pbx.port, 101))
        # Retell answers with the offer's number (RFC 3264 §6.1); with another one, rtpengine
        # 10.5 sees no telephone-event toward it and injects an in-band tone instead.
        to_pbx = await session.answer("b", sdp(ENGINE_RETELL, retell.port, 101))
        pbx_target, retell_target = media_address(to_pbx), media_address(to_retell)
        assert pbx_target is not None and retell_target is not None
        assert pbx.transport is not None and retell.transport is not None
        # Audio both ways so rtpengine has learnt both endpoints, then the digit.
        events: list[RtpPacket] = []
        async with asyncio.timeout(10):
            for i in range(60):
                header = RtpHeader(0, 1000 + i, i * 160, AUDIO_SSRC)
                pbx.transport.sendto(build_rtp(header, b"\xff" * 160), pbx_target)
                retell.transport.sendto(build_rtp(header, b"\xff" * 160), retell_target)
                if i == 10:
                    assert await session.send_dtmf("b", "4", 200)
                await asyncio.sleep(0.02)  # pacing the fake phones' audio
            while not retell.queue.empty():
                packet = parse_rtp(retell.queue.get_nowait())
                if packet.header.payload_type == 101:
                    events.append(packet)
    finally:
        await session.close()
        for endpoint in (pbx, retell):
            assert endpoint.transport is not None
            endpoint.transport.close()
        await backend.close()
    payloads = [parse_telephone_event(p.payload) for p in events]
    assert payloads and {e.event for e in payloads} == {4}
    assert payloads[-1].end and events[0].header.marker


async def test_rtpengine_without_inject_dtmf_relays_nothing(
    rtpengine_ng: tuple[str, int],
) -> None:
    backend = await start_backend(rtpengine_ng, inject_dtmf=False)
    session = await backend.allocate("rtpengine-no-dtmf@sbc")
    try:
        await session.offer("a", sdp(ENGINE_PBX, 40000, 101))
        await session.answer("b", sdp(ENGINE_RETELL, 40002, EVENT_PT))
        assert not await session.send_dtmf("b", "4", 200)
        assert "inject-DTMF" not in str(backend.offer_options)
    finally:
        await session.close()
        await backend.close()


async def test_close_stops_a_digit_being_played(pool: PortPool) -> None:
    backend, opened = await open_call(pool, EVENT_PT)
    try:
        assert await opened.session.send_dtmf("b", "0", 5000)  # 5 s: 250 packets
        assert await opened.session.send_dtmf("b", "1", 5000)  # queued behind it
        [first] = await opened.retell.receive(1)
        assert parse_telephone_event(first.payload).event == 0
    finally:
        await backend.close()  # cancels both
    injected = opened.session.stats()["sides"]["b"]["rtp"]["injected"]
    assert injected < 250  # stopped mid-event
    for endpoint in (opened.pbx, opened.retell):
        assert endpoint.transport is not None
        endpoint.transport.close()
