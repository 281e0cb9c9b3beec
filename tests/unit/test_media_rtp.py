"""RTP header helpers (RFC 3550 §5.1) and RFC 4733 telephone-event packets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.media.rtp import (
    RtpFormatError,
    RtpHeader,
    TelephoneEvent,
    build_rtp,
    build_telephone_event,
    dtmf_packets,
    parse_rtp,
    parse_telephone_event,
    read_timestamp,
    with_sequence,
)


def test_build_known_bytes() -> None:
    header = RtpHeader(payload_type=0, sequence=0x1234, timestamp=0xDEADBEEF, ssrc=0x01020304)
    data = build_rtp(header, b"\xff" * 4)
    assert data == bytes.fromhex("80001234deadbeef01020304ffffffff")
    marked = build_rtp(RtpHeader(101, 1, 2, 3, marker=True, csrcs=(7,)))
    assert marked[:2] == bytes([0x81, 0x80 | 101])
    assert marked[12:16] == (7).to_bytes(4, "big")


@given(
    st.integers(0, 127),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.booleans(),
    st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    st.binary(max_size=64),
)
def test_build_parse_round_trip(
    pt: int, seq: int, ts: int, ssrc: int, marker: bool, csrcs: list[int], payload: bytes
) -> None:
    header = RtpHeader(pt, seq, ts, ssrc, marker=marker, csrcs=tuple(csrcs))
    packet = parse_rtp(build_rtp(header, payload))
    assert packet.header == header
    assert packet.payload == payload
    assert packet.header_length == 12 + 4 * len(csrcs)
    assert read_timestamp(build_rtp(header, payload)) == ts


def test_parse_extension_and_padding() -> None:
    base = bytearray(build_rtp(RtpHeader(8, 5, 6, 7)))
    base[0] |= 0x10 | 0x20  # X and P bits
    ext = (0xBEDE).to_bytes(2, "big") + (1).to_bytes(2, "big") + b"\x01\x02\x03\x04"
    data = bytes(base) + ext + b"payload" + b"\x00\x00\x03"
    packet = parse_rtp(data)
    assert packet.payload == b"payload"
    assert packet.header.extension and packet.header.padding
    assert packet.header_length == 12 + 8


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x00",
        bytes.fromhex("40001234deadbeef01020304"),  # version 1
        bytes.fromhex("82001234deadbeef01020304") + b"\x00\x00\x00\x01",  # CSRC past end
        bytes.fromhex("90001234deadbeef01020304") + b"\xbe",  # extension header past end
        bytes.fromhex("90001234deadbeef01020304") + b"\xbe\xde\x00\x02\x00",  # extension
        bytes.fromhex("a0001234deadbeef01020304") + b"ab\x00",  # padding 0
        bytes.fromhex("a0001234deadbeef01020304") + b"ab\x09",  # padding past header
    ],
)
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(RtpFormatError):
        parse_rtp(data)


def test_build_rejects_bad_header() -> None:
    with pytest.raises(ValueError):
        build_rtp(RtpHeader(128, 0, 0, 0))
    with pytest.raises(ValueError):
        build_rtp(RtpHeader(0, 0, 0, 0, csrcs=tuple(range(16))))


def test_telephone_event_payload() -> None:
    event = TelephoneEvent(event=11, end=True, volume=10, duration=800)
    data = build_telephone_event(event)
    assert data == bytes([11, 0x80 | 10, 0x03, 0x20])
    assert parse_telephone_event(data) == event
    with pytest.raises(RtpFormatError):
        parse_telephone_event(b"\x01")
    with pytest.raises(ValueError):
        build_telephone_event(TelephoneEvent(256, False, 0, 0))
    with pytest.raises(ValueError):
        build_telephone_event(TelephoneEvent(1, False, 64, 0))


def test_dtmf_packets_follow_rfc4733_sending_rules() -> None:
    packets = [
        parse_rtp(p)
        for p in dtmf_packets(
            "#", payload_type=101, ssrc=9, first_sequence=65534, timestamp=1000, duration_ms=100
        )
    ]
    headers = [p.header for p in packets]
    events = [parse_telephone_event(p.payload) for p in packets]
    assert [h.sequence for h in headers] == [65534, 65535, 0, 1, 2, 3, 4]
    assert {h.timestamp for h in headers} == {1000}
    assert [h.marker for h in headers] == [True] + [False] * 6
    assert {e.event for e in events} == {11}
    assert [e.duration for e in events] == [160, 320, 480, 640, 800, 800, 800]
    assert [e.end for e in events] == [False] * 4 + [True] * 3


def test_dtmf_short_event_and_bad_digit() -> None:
    packets = dtmf_packets(
        "a", payload_type=96, ssrc=1, first_sequence=0, timestamp=0, duration_ms=10
    )
    assert len(packets) == 3
    assert [parse_rtp(p).header.marker for p in packets] == [True, False, False]
    assert parse_telephone_event(parse_rtp(packets[0]).payload).event == 12
    with pytest.raises(ValueError):
        dtmf_packets("x", payload_type=96, ssrc=1, first_sequence=0, timestamp=0)


def test_with_sequence_rewrites_only_the_sequence_of_rtp() -> None:
    packet = build_rtp(RtpHeader(101, 7, 123456, 0xCAFE, marker=True), b"\x05\x8a\x00\xa0")
    renumbered = with_sequence(packet, 0x1_0203)  # 16 bits kept
    header = parse_rtp(renumbered).header
    assert (header.sequence, header.timestamp, header.ssrc, header.marker) == (
        0x0203,
        123456,
        0xCAFE,
        True,
    )
    assert renumbered[4:] == packet[4:]
    assert read_timestamp(packet) == 123456
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    assert with_sequence(sender_report, 9) is sender_report  # muxed RTCP untouched
    assert with_sequence(b"\x00" * 20, 9) == b"\x00" * 20  # not RTP version 2
    assert with_sequence(b"\x80", 9) == b"\x80"
