"""RTP header helpers (RFC 3550 §5.1) and RFC 4733 telephone-event packets.

The relay reads only the sequence number and SSRC of each packet (for its counters); the rest is
for tests, benchmarks and the SIP INFO to RFC 4733 DTMF conversion.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
_FIXED = struct.Struct("!BBHII")
_EVENT = struct.Struct("!BBH")

# RFC 4733 §3.2, Table 3: DTMF named events.
DTMF_EVENTS: dict[str, int] = {
    **{str(d): d for d in range(10)},
    "*": 10,
    "#": 11,
    "A": 12,
    "B": 13,
    "C": 14,
    "D": 15,
}


class RtpFormatError(ValueError):
    """Bytes that are not an RTP packet (too short, wrong version, lengths past the end)."""


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """The RFC 3550 §5.1 fixed header and CSRC list."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool = False
    padding: bool = False
    extension: bool = False
    csrcs: tuple[int, ...] = ()
    version: int = RTP_VERSION


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """A parsed packet: the header, the payload, and the header length in bytes."""

    header: RtpHeader
    payload: bytes
    header_length: int


def read_timestamp(data: bytes) -> int:
    """The RTP timestamp of an RTP version 2 packet (at least 12 bytes)."""
    return int.from_bytes(data[4:8], "big")


def with_sequence(data: bytes, sequence: int) -> bytes:
    """``data`` with its RTP sequence number replaced (the relay's renumbering, RFC 3550 §5.1);
    anything that is not RTP version 2, or is RTCP muxed on the RTP port, comes back as is."""
    if len(data) < 12 or data[0] >> 6 != RTP_VERSION or 192 <= data[1] <= 223:
        return data
    return data[:2] + (sequence & 0xFFFF).to_bytes(2, "big") + data[4:]


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse an RTP packet; raise :class:`RtpFormatError` when it is not one."""
    if len(data) < _FIXED.size:
        raise RtpFormatError("shorter than the RTP fixed header")
    b0, b1, sequence, timestamp, ssrc = _FIXED.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise RtpFormatError(f"RTP version {b0 >> 6}")
    count = b0 & 0x0F
    offset = _FIXED.size + 4 * count
    if len(data) < offset:
        raise RtpFormatError("CSRC list past the end")
    csrcs = struct.unpack_from(f"!{count}I", data, _FIXED.size)
    extension = bool(b0 & 0x10)
    if extension:
        # RFC 3550 §5.3.1: 16-bit profile field, 16-bit length in 32-bit words.
        if len(data) < offset + 4:
            raise RtpFormatError("extension header past the end")
        words = int.from_bytes(data[offset + 2 : offset + 4], "big")
        offset += 4 + 4 * words
        if len(data) < offset:
            raise RtpFormatError("extension past the end")
    end = len(data)
    padding = bool(b0 & 0x20)
    if padding:
        # RFC 3550 §5.1: the last octet counts the padding octets, itself included.
        pad = data[-1]
        if pad == 0 or end - pad < offset:
            raise RtpFormatError("bad padding length")
        end -= pad
    header = RtpHeader(
        payload_type=b1 & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        marker=bool(b1 & 0x80),
        padding=padding,
        extension=extension,
        csrcs=tuple(csrcs),
        version=b0 >> 6,
    )
    return RtpPacket(header, bytes(data[offset:end]), offset)


def build_rtp(header: RtpHeader, payload: bytes = b"") -> bytes:
    """Serialize ``header`` and ``payload`` (no extension or padding written)."""
    if not 0 <= header.payload_type <= 127 or len(header.csrcs) > 15:
        raise ValueError("payload type must be 0-127 and at most 15 CSRCs")
    b0 = (RTP_VERSION << 6) | len(header.csrcs)
    b1 = (0x80 if header.marker else 0) | header.payload_type
    fixed = _FIXED.pack(
        b0, b1, header.sequence & 0xFFFF, header.timestamp & 0xFFFFFFFF, header.ssrc & 0xFFFFFFFF
    )
    csrcs = struct.pack(f"!{len(header.csrcs)}I", *header.csrcs)
    return fixed + csrcs + payload


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """RFC 4733 §2.3 payload: event, end bit, volume (0-63, -dBm0), duration in clock ticks."""

    event: int
    end: bool
    volume: int
    duration: int


def build_telephone_event(event: TelephoneEvent) -> bytes:
    """The 4-byte RFC 4733 §2.3 payload."""
    if not 0 <= event.event <= 255 or not 0 <= event.volume <= 63:
        raise ValueError("event must be 0-255 and volume 0-63")
    flags = (0x80 if event.end else 0) | event.volume
    return _EVENT.pack(event.event, flags, event.duration & 0xFFFF)


def parse_telephone_event(payload: bytes) -> TelephoneEvent:
    """Read an RFC 4733 §2.3 payload; raise :class:`RtpFormatError` when shorter than 4 bytes."""
    if len(payload) < _EVENT.size:
        raise RtpFormatError("telephone-event payload is 4 bytes")
    event, flags, duration = _EVENT.unpack_from(payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


def dtmf_packets(
    digit: str,
    *,
    payload_type: int,
    ssrc: int,
    first_sequence: int,
    timestamp: int,
    duration_ms: int = 100,
    packet_ms: int = 20,
    clock_rate: int = 8000,
    volume: int = 10,
) -> list[bytes]:
    """The RTP packets carrying one DTMF ``digit`` as an RFC 4733 event.

    RFC 4733 §2.5.1: every packet of the event has the event's start ``timestamp`` and a growing
    duration; the first has the marker bit; the final packet (end bit set) is sent three times
    (§2.5.1.4), each with its own sequence number.
    """
    event = DTMF_EVENTS.get(digit.upper())
    if event is None:
        raise ValueError(f"not a DTMF digit: {digit!r}")
    step = clock_rate * packet_ms // 1000
    total = clock_rate * duration_ms // 1000
    durations = [*range(step, total, step), total]
    packets: list[bytes] = []
    sequence = first_sequence
    for index, duration in enumerate(durations):
        last = index == len(durations) - 1
        for _ in range(3 if last else 1):
            first = sequence == first_sequence
            header = RtpHeader(payload_type, sequence & 0xFFFF, timestamp, ssrc, marker=first)
            payload = build_telephone_event(TelephoneEvent(event, last, volume, duration))
            packets.append(build_rtp(header, payload))
            sequence += 1
    return packets
