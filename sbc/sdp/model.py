"""The SDP session description (RFC 8866, formerly RFC 4566) as frozen values.

Fields the bridge reads or rewrites are typed (origin, connection, bandwidths, timing, media
lines, attributes); every other line (``i=``, ``u=``, ``e=``, ``p=``, ``z=``, ``k=`` and unknown
types, which RFC 8866 §5 says a parser must ignore) is kept verbatim in the order it came, so
that ``serialize_sdp(parse_sdp(body))`` gives back the same lines for RFC-ordered input.

Attributes are an ordered tuple of ``(name, value)`` pairs; ``value`` is ``None`` for a property
attribute (``a=sendrecv``) and a string, possibly empty, for a value attribute (``a=ptime:20``).
Accessors for the attributes the bridge needs (``rtpmap``, ``fmtp``, direction, ``ptime``,
``rtcp``, ``rtcp-mux``) live on the model; building a changed description is
``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

from sbc.sip.errors import NotAcceptableHere, SipError
from sbc.sip.quickinit import quick_init

Direction = Literal["sendrecv", "sendonly", "recvonly", "inactive"]
DIRECTIONS: tuple[Direction, ...] = ("sendrecv", "sendonly", "recvonly", "inactive")

Attribute = tuple[str, str | None]
Line = tuple[str, str]


class SdpError(SipError):
    """A session description that cannot be parsed (or a semantic error in one)."""

    status = 400
    reason = "Bad Request"


class NoCommonCodec(NotAcceptableHere):
    """RFC 3264 §6: nothing in the offer can be accepted; the INVITE is answered 488."""


@quick_init
@dataclass(frozen=True, slots=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``."""

    username: str
    sess_id: str
    sess_version: int
    nettype: str
    addrtype: str
    address: str


@quick_init
@dataclass(frozen=True, slots=True)
class Connection:
    """``c=<nettype> <addrtype> <connection-address>`` (address kept with any ``/ttl``)."""

    nettype: str
    addrtype: str
    address: str

    @property
    def is_hold(self) -> bool:
        """RFC 3264 §8.4 (RFC 2543 style hold): ``c=IN IP4 0.0.0.0`` means "do not send to me"."""
        return self.address in ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """``b=<bwtype>:<bandwidth>``."""

    bwtype: str
    bandwidth: int


@quick_init
@dataclass(frozen=True, slots=True)
class Timing:
    """``t=<start-time> <stop-time>`` and the ``r=`` lines that follow it (kept verbatim)."""

    start: int = 0
    stop: int = 0
    repeats: tuple[str, ...] = ()


@quick_init
@dataclass(frozen=True, slots=True)
class RtpMap:
    """One payload format: ``a=rtpmap:<pt> <encoding>/<clock rate>[/<channels>]``."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1

    @property
    def value(self) -> str:
        """The attribute value, as written on an ``a=rtpmap`` line."""
        base = f"{self.payload_type} {self.encoding}/{self.clock_rate}"
        return base if self.channels == 1 else f"{base}/{self.channels}"


@dataclass(frozen=True, slots=True)
class RtcpAddress:
    """RFC 3605: ``a=rtcp:<port> [<nettype> <addrtype> <connection-address>]``."""

    port: int
    nettype: str | None = None
    addrtype: str | None = None
    address: str | None = None


# RFC 3551 §6, Table 4 and 5: static payload types, which need no a=rtpmap line.
STATIC_PAYLOAD_TYPES: dict[int, RtpMap] = {
    rm.payload_type: rm
    for rm in (
        RtpMap(0, "PCMU", 8000),
        RtpMap(3, "GSM", 8000),
        RtpMap(4, "G723", 8000),
        RtpMap(5, "DVI4", 8000),
        RtpMap(6, "DVI4", 16000),
        RtpMap(7, "LPC", 8000),
        RtpMap(8, "PCMA", 8000),
        # RFC 3551 §4.5.2: G.722 samples at 16 kHz but its RTP clock rate is 8000.
        RtpMap(9, "G722", 8000),
        RtpMap(10, "L16", 44100, 2),
        RtpMap(11, "L16", 44100),
        RtpMap(12, "QCELP", 8000),
        RtpMap(13, "CN", 8000),
        RtpMap(14, "MPA", 90000),
        RtpMap(15, "G728", 8000),
        RtpMap(16, "DVI4", 11025),
        RtpMap(17, "DVI4", 22050),
        RtpMap(18, "G729", 8000),
        RtpMap(26, "JPEG", 90000),
        RtpMap(31, "H261", 90000),
        RtpMap(32, "MPV", 90000),
        RtpMap(33, "MP2T", 90000),
        RtpMap(34, "H263", 90000),
    )
}


def _is_number(text: str) -> bool:
    # isdigit alone takes other scripts' digits ("²", "٣"), which int() refuses or reads.
    return text.isascii() and text.isdigit()


# The longest text the SDP memos by text keep (here and in sbc.sdp.parser): a line that is
# longer is parsed every time, so that a hostile body (up to a message's 16 KB) cannot make
# a bounded memo hold kilobytes per entry. Well-formed lines (a fingerprint included) fit.
MEMO_MAX_TEXT = 256


def parse_rtpmap(value: str) -> RtpMap | None:
    """The value of an ``a=rtpmap`` attribute, or None when it is not well formed."""
    return _rtpmap(value) if len(value) <= MEMO_MAX_TEXT else _parse_rtpmap(value)


def _parse_rtpmap(value: str) -> RtpMap | None:
    """:func:`parse_rtpmap` without the memo."""
    pt_text, _, rest = value.strip().partition(" ")
    parts = rest.strip().split("/")
    n = len(parts)
    if n == 2:
        channels = 1
    elif n == 3 and _is_number(parts[2]):
        channels = int(parts[2])
    else:
        return None
    encoding, rate = parts[0], parts[1]
    if not encoding or not _is_number(pt_text) or not _is_number(rate):
        return None
    return RtpMap(int(pt_text), encoding, int(rate), channels)


# A peer writes the same rtpmap lines in every body: the result is immutable, so a bounded
# memo by text shares it.
_rtpmap = lru_cache(maxsize=256)(_parse_rtpmap)


def parse_rtcp(value: str) -> RtcpAddress | None:
    """The value of an RFC 3605 ``a=rtcp`` attribute, or None when it is not well formed."""
    parts = value.split()
    if not parts or not parts[0].isdigit() or len(parts) not in (1, 4):
        return None
    port = int(parts[0])
    if len(parts) == 1:
        return RtcpAddress(port)
    return RtcpAddress(port, parts[1], parts[2], parts[3])


def _find(attributes: tuple[Attribute, ...], name: str) -> str | None:
    for key, value in attributes:
        if key == name and value is not None:
            return value
    return None


_DIRECTION_NAMES: dict[str, Direction] = {d: d for d in DIRECTIONS}


def _direction_of(attributes: tuple[Attribute, ...]) -> Direction | None:
    for key, value in attributes:
        direction = _DIRECTION_NAMES.get(key) if value is None else None
        if direction is not None:
            return direction
    return None


@quick_init
@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One ``m=`` section: ``m=<media> <port>[/<number of ports>] <proto> <fmt> ...``.

    ``extra_head`` holds the lines met before any ``c=``/``b=`` of the section (``i=``, unknown),
    ``extra_tail`` those met after (``k=``, unknown); both are ``(type, value)`` pairs.
    """

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None
    connection: Connection | None = None
    bandwidths: tuple[Bandwidth, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    extra_head: tuple[Line, ...] = ()
    extra_tail: tuple[Line, ...] = ()

    @property
    def is_rtp(self) -> bool:
        """RTP profiles (RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF...) carry payload type numbers."""
        return "RTP/" in self.proto.upper()

    @property
    def payload_types(self) -> tuple[int, ...]:
        """The formats as integers (the parser checked them for RTP profiles)."""
        return tuple(int(f) for f in self.formats) if self.is_rtp else ()

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=<name>:<value>`` line, or None."""
        return _find(self.attributes, name)

    def has_attribute(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)

    def rtpmap(self, payload_type: int) -> RtpMap | None:
        """The encoding of ``payload_type``: its ``a=rtpmap``, else the RFC 3551 static one."""
        for key, value in self.attributes:
            if key == "rtpmap" and value is not None:
                # parse_rtpmap, inlined (every rtpmap line of every body)
                rm = _rtpmap(value) if len(value) <= MEMO_MAX_TEXT else _parse_rtpmap(value)
                if rm is not None and rm.payload_type == payload_type:
                    return rm
        return STATIC_PAYLOAD_TYPES.get(payload_type)

    def rtpmap_table(self) -> dict[int, RtpMap]:
        """Every payload type's encoding from its ``a=rtpmap`` line (the first well-formed one
        when several name it; static types without a line are not in it): what
        :meth:`rtpmap` finds for each type, with the attributes read once."""
        table: dict[int, RtpMap] = {}
        for key, value in self.attributes:
            if key == "rtpmap" and value is not None:
                # parse_rtpmap, inlined (every rtpmap line of every body)
                rm = _rtpmap(value) if len(value) <= MEMO_MAX_TEXT else _parse_rtpmap(value)
                if rm is not None and rm.payload_type not in table:
                    table[rm.payload_type] = rm
        return table

    def codecs(self) -> tuple[RtpMap, ...]:
        """The known encodings of the formats, in the ``m=`` line's (preference) order."""
        table = self.rtpmap_table()
        found = (table.get(pt) or STATIC_PAYLOAD_TYPES.get(pt) for pt in self.payload_types)
        return tuple(rm for rm in found if rm is not None)

    def fmtp(self, payload_type: int) -> str | None:
        """The parameters of ``a=fmtp:<payload_type> <parameters>``, or None."""
        prefix = str(payload_type)
        for key, value in self.attributes:
            if key == "fmtp" and value is not None:
                fmt, _, params = value.partition(" ")
                if fmt == prefix:
                    return params.strip()
        return None

    @property
    def ptime(self) -> int | None:
        """``a=ptime`` in milliseconds (RFC 8866 §6.4), None when absent or not a number."""
        value = self.attribute("ptime")
        if value is None:
            return None
        try:
            return round(float(value))
        except ValueError:
            return None

    @property
    def rtcp(self) -> RtcpAddress | None:
        """RFC 3605 ``a=rtcp``, None when absent (RTCP is then on port + 1) or malformed."""
        value = self.attribute("rtcp")
        return None if value is None else parse_rtcp(value)

    @property
    def rtcp_mux(self) -> bool:
        """RFC 5761 §5.1.1: ``a=rtcp-mux`` (RTCP shares the RTP port)."""
        return self.has_attribute("rtcp-mux")

    def with_attributes(self, attributes: tuple[Attribute, ...]) -> MediaDescription:
        return replace(self, attributes=attributes)


@quick_init
@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A whole SDP body.

    ``extra_head`` holds the lines before ``c=``/``b=``/``t=``, ``extra_tail`` those after.
    """

    origin: Origin
    session_name: str = "-"
    connection: Connection | None = None
    bandwidths: tuple[Bandwidth, ...] = ()
    timings: tuple[Timing, ...] = (Timing(),)
    attributes: tuple[Attribute, ...] = ()
    media: tuple[MediaDescription, ...] = ()
    version: int = 0
    extra_head: tuple[Line, ...] = ()
    extra_tail: tuple[Line, ...] = ()

    def attribute(self, name: str) -> str | None:
        """The value of the first session-level ``a=<name>:<value>`` line, or None."""
        return _find(self.attributes, name)

    def connection_for(self, media: MediaDescription) -> Connection | None:
        """RFC 8866 §5.7: a media-level ``c=`` overrides the session-level one."""
        return media.connection if media.connection is not None else self.connection

    def direction(self, media: MediaDescription) -> Direction:
        """The direction of ``media`` as its sender means it.

        RFC 3264 §5.1: a media-level direction attribute overrides the session-level one;
        the default is ``sendrecv``. RFC 3264 §8.4: the RFC 2543 hold (``c=`` address 0.0.0.0)
        means the sender does not want to receive, so sendrecv reads as sendonly and recvonly
        as inactive.
        """
        direction = _direction_of(media.attributes) or _direction_of(self.attributes) or "sendrecv"
        conn = self.connection_for(media)
        if conn is not None and conn.is_hold:
            if direction == "sendrecv":
                return "sendonly"
            if direction == "recvonly":
                return "inactive"
        return direction

    def audio(self) -> MediaDescription | None:
        """The first audio stream that is not disabled (port 0), or None."""
        for m in self.media:
            if m.media == "audio" and m.port != 0:
                return m
        return None
