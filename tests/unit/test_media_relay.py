"""The relay's per-socket logic (latching, RTP Bleed defence, counters) on a fake clock.

No sockets: a RelaySocket is fed datagrams directly and its peer has a recording transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sbc.media.base import PassthroughSession, clamp_dtmf_duration, telephone_event
from sbc.media.relay import RelaySocket
from sbc.media.rtp import RtpHeader, build_rtp, dtmf_packets, parse_rtp
from sbc.sdp.parser import parse_sdp

PBX_SDP = ("10.0.0.2", 9000)
NAT = ("203.0.113.9", 41000)
OTHER = ("203.0.113.9", 41002)
RETELL = ("198.51.100.7", 14000)


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now

    def create_future(self) -> Any:
        return _Future()


class _Future:
    def __init__(self) -> None:
        self.result: object = "pending"

    def done(self) -> bool:
        return self.result != "pending"

    def set_result(self, value: object) -> None:
        self.result = value


class RecordingTransport(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))


def pair(window: float = 3.0) -> tuple[FakeLoop, RelaySocket, RelaySocket, RecordingTransport]:
    loop = FakeLoop()
    facing_pbx = RelaySocket(loop, "a", is_rtp=True, sock=None, port=20000, window=window)  # type: ignore[arg-type]
    facing_retell = RelaySocket(loop, "b", is_rtp=True, sock=None, port=20002, window=window)  # type: ignore[arg-type]
    facing_pbx.peer = facing_retell
    facing_retell.peer = facing_pbx
    out = RecordingTransport()
    facing_retell.connection_made(out)
    facing_pbx.connection_made(RecordingTransport())
    facing_retell.set_sdp_remote(RETELL)
    facing_pbx.set_sdp_remote(PBX_SDP)
    return loop, facing_pbx, facing_retell, out


def rtp(seq: int, ssrc: int = 1, payload: bytes = b"x" * 160) -> bytes:
    return build_rtp(RtpHeader(0, seq & 0xFFFF, seq * 160, ssrc), payload)


def test_packets_are_forwarded_to_the_other_sides_remote_untouched() -> None:
    _, facing_pbx, _, out = pair()
    packet = rtp(1)
    facing_pbx.datagram_received(packet, PBX_SDP)
    assert out.sent == [(packet, RETELL)]
    assert (facing_pbx.packets, facing_pbx.bytes, facing_pbx.last) == (1, len(packet), 100.0)


def test_nat_source_is_latched_within_the_window() -> None:
    loop, facing_pbx, _, out = pair(window=0.2)
    facing_pbx.datagram_received(rtp(1), NAT)
    assert facing_pbx.remote == NAT
    loop.now += 0.1
    facing_pbx.datagram_received(rtp(2), OTHER)  # still learning: follows the newest source
    assert facing_pbx.remote == OTHER
    assert facing_pbx.dropped == 0
    assert len(out.sent) == 2


def test_after_the_window_other_sources_are_dropped_and_counted() -> None:
    loop, facing_pbx, _, out = pair(window=0.2)
    facing_pbx.datagram_received(rtp(1), NAT)
    loop.now += 0.25
    facing_pbx.datagram_received(rtp(2), OTHER)
    facing_pbx.datagram_received(rtp(3), PBX_SDP)
    assert facing_pbx.dropped == 2
    assert facing_pbx.remote == NAT
    facing_pbx.datagram_received(rtp(4), NAT)
    assert [p for p, _ in out.sent] == [rtp(1), rtp(4)]
    assert facing_pbx.packets == 2


def test_new_sdp_address_restarts_learning_and_same_address_keeps_latch() -> None:
    loop, facing_pbx, _, _ = pair(window=0.2)
    facing_pbx.datagram_received(rtp(1), NAT)
    loop.now += 1
    facing_pbx.set_sdp_remote(PBX_SDP)  # refresh with the same SDP: latch kept
    assert facing_pbx.remote == NAT
    facing_pbx.set_sdp_remote(None)  # hold with c=0.0.0.0: nothing learnt
    facing_pbx.set_sdp_remote(("pbx.example.com", 9000))  # no DNS per packet
    facing_pbx.set_sdp_remote(("10.0.0.2", 0))
    assert facing_pbx.remote == NAT
    facing_pbx.set_sdp_remote(("10.0.0.3", 9002))
    assert facing_pbx.remote == ("10.0.0.3", 9002)
    facing_pbx.datagram_received(rtp(2), OTHER)
    assert facing_pbx.remote == OTHER
    assert facing_pbx.dropped == 0


def test_a_source_the_sdp_moved_away_from_is_never_latched_again() -> None:
    # A transfer by INVITE re-points side b from the agent to the human: the agent may keep
    # sending for a moment, and must not win the new learning window.
    loop, _, facing_retell, _ = pair(window=3.0)
    facing_retell.datagram_received(rtp(1), RETELL)
    loop.now += 10
    human = ("10.0.0.77", 7000)
    facing_retell.set_sdp_remote(human)
    facing_retell.datagram_received(rtp(2), RETELL)  # the agent, still talking
    assert facing_retell.remote == human
    assert facing_retell.dropped == 1
    facing_retell.datagram_received(rtp(3, ssrc=2), ("10.0.0.77", 7002))  # the human behind NAT
    assert facing_retell.remote == ("10.0.0.77", 7002)
    facing_retell.set_sdp_remote(RETELL)  # moved back: allowed again
    assert facing_retell.remote == RETELL and RETELL not in facing_retell.retired


def test_unroutable_when_the_other_side_has_no_address_yet() -> None:
    loop = FakeLoop()
    lone = RelaySocket(loop, "a", is_rtp=True, sock=None, port=1, window=1)  # type: ignore[arg-type]
    lone.datagram_received(rtp(1), NAT)
    assert lone.unroutable == 1
    peer = RelaySocket(loop, "b", is_rtp=True, sock=None, port=3, window=1)  # type: ignore[arg-type]
    lone.peer = peer
    lone.datagram_received(rtp(2), NAT)
    assert lone.unroutable == 2


@pytest.mark.parametrize(
    ("sequences", "gaps", "lost"),
    [
        ([1, 2, 3, 4], 0, 0),
        ([1, 2, 5, 6], 1, 2),
        ([65534, 65535, 0, 1], 0, 0),  # 16-bit wrap is no gap
        ([65535, 2], 1, 2),
        ([5, 4, 6], 0, 0),  # late packet ignored
        ([5, 5, 6], 0, 0),  # duplicate
        ([1, 3, 5], 2, 2),
    ],
)
def test_sequence_gaps(sequences: list[int], gaps: int, lost: int) -> None:
    _, facing_pbx, _, _ = pair()
    for seq in sequences:
        facing_pbx.datagram_received(rtp(seq), PBX_SDP)
    assert (facing_pbx.seq_gaps, facing_pbx.lost) == (gaps, lost)


def test_new_ssrc_restarts_sequence_tracking_and_rtcp_is_not_counted() -> None:
    _, facing_pbx, _, out = pair()
    facing_pbx.datagram_received(rtp(10, ssrc=1), PBX_SDP)
    facing_pbx.datagram_received(rtp(500, ssrc=2), PBX_SDP)
    facing_pbx.datagram_received(rtp(501, ssrc=2), PBX_SDP)
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    facing_pbx.datagram_received(sender_report, PBX_SDP)  # muxed RTCP
    facing_pbx.datagram_received(b"\x00", PBX_SDP)  # not RTP at all: relayed, not parsed
    assert (facing_pbx.seq_gaps, facing_pbx.packets) == (0, 5)
    assert out.sent[-2][0] == sender_report


def test_counters_and_lifecycle_callbacks() -> None:
    _, facing_pbx, _, _ = pair()
    facing_pbx.error_received(OSError("unreachable"))
    facing_pbx.datagram_received(rtp(1), PBX_SDP)
    counters = facing_pbx.counters()
    assert counters["errors"] == 1
    assert counters["packets"] == 1
    assert counters["remote"] == "10.0.0.2:9000"
    facing_pbx.connection_lost(None)
    facing_pbx.connection_lost(None)
    assert facing_pbx.lost_future.done()
    loop = FakeLoop()
    fresh = RelaySocket(loop, "a", is_rtp=False, sock=None, port=1, window=1)  # type: ignore[arg-type]
    assert fresh.counters()["remote"] is None


def test_rtp_toward_a_side_on_hold_is_muted_but_rtcp_flows() -> None:
    _, facing_pbx, facing_retell, out = pair()
    facing_retell.send_allowed = False  # the last SDP sent to Retell was recvonly
    facing_pbx.datagram_received(rtp(1), PBX_SDP)
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    facing_pbx.datagram_received(sender_report, PBX_SDP)
    assert out.sent == [(sender_report, RETELL)]
    assert facing_pbx.muted == 1
    assert facing_pbx.counters()["muted"] == 1
    facing_retell.send_allowed = True
    facing_pbx.datagram_received(rtp(2), PBX_SDP)
    assert out.sent[-1] == (rtp(2), RETELL)


# -- DTMF injection: per-side output numbering --------------------------------------------------


def _event(first_sequence: int = 0) -> bytes:
    return dtmf_packets("5", payload_type=101, ssrc=1, first_sequence=first_sequence, timestamp=0)[
        0
    ]


def test_forwarded_audio_is_untouched_until_the_first_injection_then_renumbered() -> None:
    _, facing_pbx, facing_retell, out = pair()
    facing_pbx.datagram_received(rtp(100), PBX_SDP)
    facing_pbx.datagram_received(rtp(101), PBX_SDP)
    assert [p for p, _ in out.sent] == [rtp(100), rtp(101)]  # the same bytes: no rewrite
    assert facing_pbx.last_rtp == rtp(101)
    facing_retell.seq_next = facing_pbx.next_sequence()
    facing_retell.renumber = True
    assert facing_retell.inject(_event(first_sequence=9000))
    facing_pbx.datagram_received(rtp(102), PBX_SDP)
    facing_pbx.datagram_received(rtp(104), PBX_SDP)  # 103 lost upstream: no gap downstream
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    facing_pbx.datagram_received(sender_report, PBX_SDP)  # muxed RTCP: untouched, no number
    facing_pbx.datagram_received(b"\x00\x01", PBX_SDP)  # junk: untouched
    facing_pbx.datagram_received(rtp(105), PBX_SDP)
    sent = [p for p, _ in out.sent]
    assert [parse_rtp(p).header.sequence for p in (sent[2], sent[3], sent[4], sent[7])] == [
        102,
        103,
        104,
        105,
    ]
    assert parse_rtp(sent[2]).header.payload_type == 101
    assert bytes(sent[4])[4:] == rtp(104)[4:]  # only the sequence number changed
    assert (sent[5], sent[6]) == (sender_report, b"\x00\x01")
    assert facing_retell.counters()["injected"] == 1


def test_output_numbering_wraps_at_16_bits() -> None:
    _, facing_pbx, facing_retell, out = pair()
    facing_pbx.datagram_received(rtp(65534), PBX_SDP)
    facing_retell.seq_next = facing_pbx.next_sequence()
    facing_retell.renumber = True
    facing_retell.inject(_event())
    facing_pbx.datagram_received(rtp(65535), PBX_SDP)
    assert [parse_rtp(p).header.sequence for p, _ in out.sent] == [65534, 65535, 0]


def test_injection_needs_an_address_an_open_socket_and_no_hold() -> None:
    loop = FakeLoop()
    lone = RelaySocket(loop, "b", is_rtp=True, sock=None, port=1, window=1)  # type: ignore[arg-type]
    assert not lone.inject(_event())  # no remote yet
    lone.set_sdp_remote(RETELL)
    assert not lone.inject(_event())  # no transport
    transport = RecordingTransport()
    lone.connection_made(transport)
    lone.send_allowed = False
    assert not lone.inject(_event())  # RFC 3264 §6.1: on hold
    lone.send_allowed = True
    assert lone.inject(_event())
    assert (lone.injected, lone.seq_next, len(transport.sent)) == (1, 1, 1)
    assert 0 <= lone.next_sequence() <= 0xFFFF  # nothing received: a random start


_SDP = """v=0\r
o=- 1 1 IN IP4 10.0.0.2\r
s=-\r
c=IN IP4 10.0.0.2\r
t=0 0\r
m=audio {port} RTP/AVP {formats}\r
{attributes}"""


def _sdp(formats: str, attributes: str = "", port: int = 9000) -> Any:
    text = _SDP.format(port=port, formats=formats, attributes=attributes)
    return parse_sdp(text.encode())


@pytest.mark.parametrize(
    ("formats", "attributes", "expected"),
    [
        ("0 101", "a=rtpmap:101 telephone-event/8000\r\n", (101, 8000)),
        ("9 101", "a=rtpmap:101 TELEPHONE-EVENT/8000\r\n", (101, 8000)),  # G.722: 8000 clock
        (
            "96 100 101",
            "a=rtpmap:96 opus/48000/2\r\na=rtpmap:100 telephone-event/8000\r\n"
            "a=rtpmap:101 telephone-event/48000\r\n",
            (101, 48000),  # the one at the audio's rate
        ),
        ("0 100", "a=rtpmap:100 telephone-event/16000\r\n", (100, 16000)),  # only one: used
        ("0 8", "", None),
    ],
)
def test_telephone_event_format_of_a_side(
    formats: str, attributes: str, expected: tuple[int, int] | None
) -> None:
    assert telephone_event(_sdp(formats, attributes)) == expected


def test_no_telephone_event_without_an_active_audio_stream() -> None:
    assert telephone_event(None) is None
    assert telephone_event(_sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n", port=0)) is None


def test_dtmf_duration_is_clamped() -> None:
    assert [clamp_dtmf_duration(d) for d in (0, 40, 160, 5000, 60000)] == [40, 40, 160, 5000, 5000]


async def test_passthrough_cannot_inject_dtmf() -> None:
    session = PassthroughSession("call-1")
    assert await session.send_dtmf("b", "5", 160) is False


class LockSocket:
    """Records connect() calls; fileno -1 makes the AF_UNSPEC disconnect impossible."""

    def __init__(self, fileno: int = -1, fail: bool = False) -> None:
        self.connected: list[tuple[str, int]] = []
        self._fileno = fileno
        self.fail = fail

    def connect(self, address: tuple[str, int]) -> None:
        if self.fail:
            raise OSError("refused")
        self.connected.append(address)

    def fileno(self) -> int:
        return self._fileno


def test_first_stray_packet_after_the_window_locks_the_socket_to_the_latched_source() -> None:
    loop, facing_pbx, _, _ = pair(window=0.2)
    sock = facing_pbx.sock = LockSocket()
    facing_pbx.datagram_received(rtp(1), OTHER)  # within the window: latched, no lock
    facing_pbx.datagram_received(rtp(2), NAT)
    assert (facing_pbx.locked, sock.connected) == (False, [])
    loop.now += 0.25
    facing_pbx.datagram_received(rtp(3), NAT)  # the latched source: nothing to do
    assert sock.connected == []
    facing_pbx.datagram_received(rtp(4), OTHER)
    assert (facing_pbx.locked, sock.connected, facing_pbx.dropped) == (True, [NAT], 1)
    facing_pbx.datagram_received(rtp(5), OTHER)  # queued before the lock: dropped, no new lock
    assert (sock.connected, facing_pbx.dropped) == ([NAT], 2)
    assert (facing_pbx.counters()["dropped"], facing_pbx.counters()["locked"]) == (2, True)


def test_a_lock_that_cannot_be_undone_is_re_aimed_at_the_new_sdp_address() -> None:
    loop, facing_pbx, _, _ = pair(window=0.2)
    sock = facing_pbx.sock = LockSocket(fileno=-1)
    facing_pbx.datagram_received(rtp(1), NAT)
    loop.now += 0.25
    facing_pbx.datagram_received(rtp(2), OTHER)
    assert facing_pbx.locked
    moved = ("10.0.0.3", 9002)
    facing_pbx.set_sdp_remote(moved)
    assert facing_pbx.locked  # still connected, now to the new SDP address
    assert sock.connected == [NAT, moved]
    assert facing_pbx.remote == moved


def test_a_failed_lock_leaves_filtering_in_user_space() -> None:
    loop, facing_pbx, _, _ = pair(window=0.2)
    facing_pbx.sock = LockSocket(fail=True)
    facing_pbx.datagram_received(rtp(1), NAT)
    loop.now += 0.25
    for seq in (2, 3):
        facing_pbx.datagram_received(rtp(seq), OTHER)
    assert not facing_pbx.locked
    assert facing_pbx.dropped == 2
    assert facing_pbx.remote == NAT
