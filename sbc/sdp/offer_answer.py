"""Offer/answer rewriting for the bridge (RFC 3264).

What a B2BUA does to SDP between its legs: keep only codecs both sides can take
(:func:`filter_codecs`), put its own addresses and ports in (:func:`rewrite_connection`), answer
PBX hold and refresh re-offers itself (:func:`answer_for_hold`), and read what was agreed
(:func:`negotiated`). Every function returns a new :class:`SessionDescription`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sbc.sdp.model import (
    DIRECTIONS,
    STATIC_PAYLOAD_TYPES,
    Attribute,
    Connection,
    Direction,
    MediaDescription,
    NoCommonCodec,
    Origin,
    RtpMap,
    SessionDescription,
    parse_rtcp,
)

# Formats that carry no audio of their own: an offer left with only these has no common codec.
AUXILIARY_ENCODINGS = frozenset({"telephone-event", "cn"})

# RFC 3264 §6.1: the answerer's direction for each offered direction.
MIRRORED: dict[Direction, Direction] = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}

# Attributes that name payload types: removed along with the payload type they refer to.
_PT_ATTRIBUTES = frozenset({"rtpmap", "fmtp", "rtcp-fb"})

# ICE (RFC 8839) attributes: they carry the peer's own addresses, which must not cross legs.
_ICE_ATTRIBUTES = frozenset(
    {"candidate", "remote-candidates", "ice-ufrag", "ice-pwd", "ice-options", "ice-lite"}
    | {"end-of-candidates", "ice-mismatch", "ice-pacing"}
)


@dataclass(frozen=True, slots=True)
class Codec:
    """A payload type as agreed: its number, encoding, and ``a=fmtp`` parameters."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1
    fmtp: str | None = None


@dataclass(frozen=True, slots=True)
class Negotiation:
    """What an offer and its answer agreed on for the first active audio stream."""

    codecs: tuple[Codec, ...]
    telephone_event: Codec | None
    ptime: int | None
    direction: Direction

    @property
    def codec(self) -> Codec:
        """The codec the answerer will send first (RFC 3264 §6.1: the first listed)."""
        return self.codecs[0]


def _pt_of(attribute: Attribute) -> int | None:
    name, value = attribute
    if name not in _PT_ATTRIBUTES or value is None:
        return None
    fmt = value.partition(" ")[0]
    return int(fmt) if fmt.isascii() and fmt.isdigit() else None


def _media_with(
    m: MediaDescription, port: int, formats: tuple[str, ...], attributes: tuple[Attribute, ...]
) -> MediaDescription:
    """``replace(m, port=..., formats=..., attributes=...)`` built directly: ``replace``
    walks the fields by name and costs several times more (two per call)."""
    return MediaDescription(
        m.media,
        port,
        m.proto,
        formats,
        m.port_count,
        m.connection,
        m.bandwidths,
        attributes,
        m.extra_head,
        m.extra_tail,
    )


def _with_media(sd: SessionDescription, media: tuple[MediaDescription, ...]) -> SessionDescription:
    """``replace(sd, media=media)`` built directly (see :func:`_media_with`)."""
    return SessionDescription(
        sd.origin,
        sd.session_name,
        sd.connection,
        sd.bandwidths,
        sd.timings,
        sd.attributes,
        media,
        sd.version,
        sd.extra_head,
        sd.extra_tail,
    )


def _keep_formats(m: MediaDescription, keep: Sequence[int]) -> MediaDescription:
    kept = set(keep)
    # An rtcp-fb line for "*" (every format, RFC 4585 §4.2) names no PT and stays.
    attributes = tuple([a for a in m.attributes if (pt := _pt_of(a)) is None or pt in kept])
    formats = tuple([str(pt) for pt in keep])
    if formats == m.formats and attributes == m.attributes:
        # Nothing removed (an offer of the configured codecs only): the same value.
        return m
    return _media_with(m, m.port, formats, attributes)


def filter_codecs(sd: SessionDescription, allowed: Sequence[str]) -> SessionDescription:
    """Keep only audio formats whose encoding is in ``allowed`` (case-insensitive), in order.

    ``a=rtpmap``/``a=fmtp``/``a=rtcp-fb`` lines of removed payload types go too. Non-audio
    streams, and audio streams left with no real codec, are disabled with port 0 (RFC 3264
    §8.2; their formats stay, since an ``m=`` line needs at least one). Raise
    :class:`NoCommonCodec` (488) when no audio stream keeps a codec other than
    telephone-event or CN.
    """
    names = {a.casefold() for a in allowed}
    media: list[MediaDescription] = []
    usable = False
    for m in sd.media:
        if m.media != "audio" or not m.is_rtp or m.port == 0:
            media.append(m if m.port == 0 else _media_with(m, 0, m.formats, m.attributes))
            continue
        # What m.rtpmap(pt) gives for each pt, with the attributes parsed once.
        table = m.rtpmap_table()
        kept: list[tuple[int, str]] = []
        real = False
        for pt in m.payload_types:
            rm = table.get(pt) or STATIC_PAYLOAD_TYPES.get(pt)
            if rm is not None and (encoding := rm.encoding.casefold()) in names:
                kept.append((pt, encoding))
                real = real or encoding not in AUXILIARY_ENCODINGS
        if real:
            usable = True
            media.append(_keep_formats(m, [pt for pt, _ in kept]))
        else:
            media.append(_media_with(m, 0, m.formats, m.attributes))
    if not usable:
        raise NoCommonCodec("no common audio codec")
    return _with_media(sd, tuple(media))


def _addrtype(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _rewrite_attributes(
    attributes: tuple[Attribute, ...], port: int, conn: Connection
) -> tuple[Attribute, ...]:
    out: list[Attribute] = []
    for name, value in attributes:
        if name in _ICE_ATTRIBUTES:
            continue
        if name == "rtcp" and value is not None:
            rtcp = parse_rtcp(value)
            if rtcp is None:
                continue  # malformed: drop it; RTCP then defaults to port + 1
            # RFC 3605 §2.1: RTCP port; the relay allocates it as RTP port + 1.
            if rtcp.address is None:
                value = str(port + 1)
            else:
                value = f"{port + 1} {conn.nettype} {conn.addrtype} {conn.address}"
        out.append((name, value))
    return tuple(out)


def rewrite_connection(
    sd: SessionDescription,
    address: str,
    ports: Sequence[int],
    *,
    bump_version: bool = False,
) -> SessionDescription:
    """Put ``address`` in ``o=`` and every ``c=``, and ``ports[i]`` in the i-th ``m=`` line.

    Disabled streams (port 0) stay disabled. A session-level ``c=`` is written (media-level
    ones that existed are rewritten too); ``a=rtcp`` is rewritten to the new port + 1 and ICE
    attributes are dropped, since both would carry the other leg's addresses.
    ``bump_version`` increments the ``o=`` sess-version (RFC 3264 §8: a changed offer).
    """
    if len(ports) != len(sd.media):
        raise ValueError(f"{len(sd.media)} media streams but {len(ports)} ports")
    conn = Connection("IN", _addrtype(address), address)
    media = []
    for m, port in zip(sd.media, ports, strict=True):
        new_port = 0 if m.port == 0 else port
        media.append(
            replace(
                m,
                port=new_port,
                connection=None if m.connection is None else conn,
                attributes=_rewrite_attributes(m.attributes, new_port, conn),
            )
        )
    o = sd.origin
    version = o.sess_version + 1 if bump_version else o.sess_version
    origin = Origin(o.username, o.sess_id, version, "IN", conn.addrtype, address)
    session_attributes = tuple(a for a in sd.attributes if a[0] not in _ICE_ATTRIBUTES)
    return replace(
        sd, origin=origin, connection=conn, media=tuple(media), attributes=session_attributes
    )


def _set_direction(
    attributes: tuple[Attribute, ...], direction: Direction | None
) -> tuple[Attribute, ...]:
    out = tuple(a for a in attributes if not (a[1] is None and a[0] in DIRECTIONS))
    return out if direction is None else (*out, (direction, None))


def with_direction(sd: SessionDescription, direction: Direction) -> SessionDescription:
    """Set ``direction`` on every stream; drop session-level direction attributes."""
    media = tuple(m.with_attributes(_set_direction(m.attributes, direction)) for m in sd.media)
    return replace(sd, attributes=_set_direction(sd.attributes, None), media=media)


def _same_codec(a: RtpMap, b: RtpMap) -> bool:
    return (
        a.encoding.casefold() == b.encoding.casefold()
        and a.clock_rate == b.clock_rate
        and a.channels == b.channels
    )


def _matching_pt(m: MediaDescription, wanted: RtpMap) -> int | None:
    for pt in m.payload_types:
        rm = m.rtpmap(pt)
        if rm is not None and _same_codec(rm, wanted):
            return pt
    return None


def _codec(m: MediaDescription, pt: int, rm: RtpMap) -> Codec:
    return Codec(pt, rm.encoding, rm.clock_rate, rm.channels, m.fmtp(pt))


def negotiated(offer: SessionDescription, answer: SessionDescription) -> Negotiation:
    """The codecs of the first active audio stream of ``answer`` that ``offer`` also lists.

    Payload type numbers are the answer's (those the answerer will send with, RFC 3264 §6.1).
    Raise :class:`NoCommonCodec` when the answer keeps no real audio codec of the offer.
    """
    offered = offer.audio()
    if offered is None:
        raise NoCommonCodec("offer has no active audio stream")
    index = offer.media.index(offered)
    if index >= len(answer.media) or answer.media[index].port == 0:
        raise NoCommonCodec("answer rejected the audio stream")
    m = answer.media[index]
    codecs: list[Codec] = []
    event: Codec | None = None
    for pt in m.payload_types:
        rm = m.rtpmap(pt)
        if rm is None or _matching_pt(offered, rm) is None:
            continue
        name = rm.encoding.casefold()
        if name == "telephone-event":
            event = event or _codec(m, pt, rm)
        elif name not in AUXILIARY_ENCODINGS:
            codecs.append(_codec(m, pt, rm))
    if not codecs:
        raise NoCommonCodec("answer has no codec of the offer")
    return Negotiation(tuple(codecs), event, m.ptime, answer.direction(m))


def _answer_stream(
    m: MediaDescription, direction: Direction, previous: MediaDescription, port: int
) -> MediaDescription:
    keep: dict[int, RtpMap] = {}
    for wanted in previous.codecs():
        pt = _matching_pt(m, wanted)
        if pt is not None and pt not in keep:
            rm = m.rtpmap(pt)
            assert rm is not None  # _matching_pt found it
            keep[pt] = rm
    if all(rm.encoding.casefold() in AUXILIARY_ENCODINGS for rm in keep.values()):
        raise NoCommonCodec("re-offer dropped the negotiated codec")
    attributes: list[Attribute] = []
    for pt, rm in keep.items():
        attributes.append(("rtpmap", rm.value))
        params = m.fmtp(pt)
        if params is not None:
            attributes.append(("fmtp", f"{pt} {params}"))
    if previous.ptime is not None:
        attributes.append(("ptime", str(previous.ptime)))
    attributes.append((MIRRORED[direction], None))
    return MediaDescription(
        "audio", port, m.proto, tuple(str(pt) for pt in keep), attributes=tuple(attributes)
    )


def answer_for_hold(
    offer: SessionDescription,
    local_address: str,
    local_port: int,
    *,
    session_version: int,
    previous: SessionDescription,
) -> SessionDescription:
    """Answer a PBX re-offer (hold, resume, refresh) at the bridge, without the far leg.

    ``previous`` is the SDP the bridge last sent on this leg: its ``o=`` username and sess-id
    are kept and the version becomes ``session_version`` (RFC 3264 §8: the caller bumps it only
    when the answer differs from the previous one). The codecs are those of ``previous`` that
    the re-offer still lists, with the offer's payload type numbers (RFC 3264 §6.1); the
    direction mirrors the offer's (RFC 3264 §6.1, c=0.0.0.0 read as RFC 3264 §8.4 hold). Only
    the first active audio stream is accepted; every other stream gets port 0 (RFC 3264 §6:
    the answer has as many ``m=`` lines as the offer). Raise :class:`NoCommonCodec` when the
    re-offer no longer lists the negotiated codec.
    """
    previous_audio = previous.audio()
    target = offer.audio()
    if target is None or previous_audio is None or not target.is_rtp:
        raise NoCommonCodec("re-offer has no active audio stream")
    conn = Connection("IN", _addrtype(local_address), local_address)
    media: list[MediaDescription] = []
    for m in offer.media:
        if m is target:
            media.append(_answer_stream(m, offer.direction(m), previous_audio, local_port))
        else:
            # RFC 3264 §6: a rejected stream keeps its m= line with port 0.
            media.append(MediaDescription(m.media, 0, m.proto, m.formats))
    o = previous.origin
    origin = Origin(o.username, o.sess_id, session_version, "IN", conn.addrtype, local_address)
    return SessionDescription(
        origin=origin,
        session_name=previous.session_name,
        connection=conn,
        timings=previous.timings,
        media=tuple(media),
    )
