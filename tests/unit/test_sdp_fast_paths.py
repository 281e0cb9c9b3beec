"""The SDP fast paths give what the general code gives: CRLF line splitting, the inlined line
checks of parse_sdp, the rtpmap table of filter_codecs and the direct dataclass builds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.sdp.model import (
    STATIC_PAYLOAD_TYPES,
    Bandwidth,
    Connection,
    MediaDescription,
    NoCommonCodec,
    Origin,
    SdpError,
    SessionDescription,
    parse_rtpmap,
)
from sbc.sdp.offer_answer import (
    AUXILIARY_ENCODINGS,
    _media_with,
    _pt_of,
    _with_media,
    filter_codecs,
)
from sbc.sdp.parser import _any_lines, _connection, _decoded, _lines, _timing, parse_sdp

_PIECES = ["v=0", "a=x", "m=audio 1 RTP/AVP 0", "", " ", "\r\n", "\n", "\r"]


@given(st.lists(st.sampled_from(_PIECES)))
def test_crlf_split_equals_the_general_split(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert _lines(text) == _any_lines(text)
    assert _lines(_decoded(text.encode())) == _any_lines(text)


def _audio(formats: str, *attributes: str) -> bytes:
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0"]
    lines += [f"m=audio 4000 RTP/AVP {formats}", *attributes]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_payload_types_fast_check_agrees_with_the_general_one() -> None:
    audio = parse_sdp(_audio("0 0101 127")).audio()
    assert audio is not None and audio.payload_types == (0, 101, 127)
    for bad in ("128", "1a", "²", "00000000000000000000128"):
        with pytest.raises(SdpError):
            parse_sdp(_audio(f"0 {bad}"))


@pytest.mark.parametrize(
    "line", ["a", "a=", "=x", "A=x", "a=x\x00", "a=b\rc", "a= x:y", "a=:y"], ids=repr
)
def test_inlined_line_checks_raise_as_before(line: str) -> None:
    with pytest.raises(SdpError):
        parse_sdp(_audio("0", line))


def test_attribute_lines_keep_their_values() -> None:
    audio = parse_sdp(_audio("0", "a=sendrecv", "a=ptime:20", "a=x:", "a=y:a:b")).audio()
    assert audio is not None
    assert audio.attributes == (("sendrecv", None), ("ptime", "20"), ("x", ""), ("y", "a:b"))


_RTPMAP_VALUES = st.sampled_from(
    [
        "0 PCMU/8000",
        "8 PCMA/8000",
        "9 G722/8000",
        "101 telephone-event/8000",
        "96 opus/48000/2",
        "96 OPUS/48000",
        "13 CN/8000",
        "97 x/8000/²",
        "98 /8000",
        "99 y/z",
        "², PCMU/8000",
        " 0  PCMU/8000 ",
        "100 a/1/2/3",
    ]
)


@st.composite
def _media(draw: st.DrawFn) -> MediaDescription:
    rtp = draw(st.booleans())
    pts = ["0", "8", "9", "13", "18", "96", "97", "101", "0101"]
    formats = draw(st.lists(st.sampled_from(pts), min_size=1))
    attributes = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("rtpmap"), _RTPMAP_VALUES | st.none()),
                st.tuples(st.sampled_from(["fmtp", "rtcp-fb"]), st.sampled_from([*formats, "*"])),
                st.tuples(st.sampled_from(["ptime", "sendrecv"]), st.none() | st.just("20")),
            ),
            max_size=8,
        )
    )
    return MediaDescription(
        draw(st.sampled_from(["audio", "video"])),
        draw(st.sampled_from([0, 4000])),
        "RTP/AVP" if rtp else "UDP/BFCP",
        tuple(formats),
        port_count=draw(st.none() | st.just(2)),
        connection=draw(st.none() | st.just(Connection("IN", "IP4", "192.0.2.9"))),
        attributes=tuple(attributes),
    )


_DESCRIPTIONS = st.builds(
    SessionDescription,
    origin=st.just(Origin("-", "1", 1, "IN", "IP4", "192.0.2.1")),
    media=st.lists(_media(), max_size=3).map(tuple),
)


def _reference_filter(sd: SessionDescription, allowed: Sequence[str]) -> SessionDescription:
    """filter_codecs as it was written before its fast path: rtpmap() per payload type and
    dataclasses.replace."""
    names = {a.casefold() for a in allowed}
    media: list[MediaDescription] = []
    usable = False
    for m in sd.media:
        if m.media != "audio" or not m.is_rtp or m.port == 0:
            media.append(m if m.port == 0 else dataclasses.replace(m, port=0))
            continue
        kept = [
            (pt, encoding)
            for pt in m.payload_types
            if (rm := m.rtpmap(pt)) and (encoding := rm.encoding.casefold()) in names
        ]
        if any(encoding not in AUXILIARY_ENCODINGS for _, encoding in kept):
            usable = True
            keep = {pt for pt, _ in kept}
            attributes = tuple(a for a in m.attributes if (pt := _pt_of(a)) is None or pt in keep)
            formats = tuple(str(pt) for pt, _ in kept)
            media.append(dataclasses.replace(m, formats=formats, attributes=attributes))
        else:
            media.append(dataclasses.replace(m, port=0))
    if not usable:
        raise NoCommonCodec("no common audio codec")
    return dataclasses.replace(sd, media=tuple(media))


@given(_DESCRIPTIONS, st.sampled_from([("PCMU", "PCMA", "G722", "telephone-event"), ("opus",)]))
@settings(max_examples=300)
def test_filter_codecs_equals_the_reference(sd: SessionDescription, allowed: tuple[str]) -> None:
    try:
        expected: SessionDescription | None = _reference_filter(sd, allowed)
    except NoCommonCodec:
        expected = None
    if expected is None:
        with pytest.raises(NoCommonCodec):
            filter_codecs(sd, allowed)
    else:
        assert filter_codecs(sd, allowed) == expected


@given(_media())
def test_rtpmap_table_is_what_rtpmap_finds(m: MediaDescription) -> None:
    table = m.rtpmap_table()
    for pt in range(128):
        assert (table.get(pt) or STATIC_PAYLOAD_TYPES.get(pt)) == m.rtpmap(pt)
    assert m.codecs() == tuple(rm for pt in m.payload_types if (rm := m.rtpmap(pt)) is not None)


def test_rtpmap_refuses_digits_of_other_scripts() -> None:
    assert parse_rtpmap("97 x/8000/²") is None
    assert parse_rtpmap("97 x/٨٠٠٠") is None
    assert parse_rtpmap("96 opus/48000/2") is not None


def test_direct_builds_equal_replace() -> None:
    # A field added to either dataclass must be added to _media_with and _with_media too.
    assert [f.name for f in dataclasses.fields(MediaDescription)] == [
        "media",
        "port",
        "proto",
        "formats",
        "port_count",
        "connection",
        "bandwidths",
        "attributes",
        "extra_head",
        "extra_tail",
    ]
    assert [f.name for f in dataclasses.fields(SessionDescription)] == [
        "origin",
        "session_name",
        "connection",
        "bandwidths",
        "timings",
        "attributes",
        "media",
        "version",
        "extra_head",
        "extra_tail",
    ]
    sd = parse_sdp(_audio("0 8", "b=AS:64", "k=x", "a=rtpmap:0 PCMU/8000"))
    m = sd.media[0]
    assert _media_with(m, 9, ("8",), ()) == dataclasses.replace(
        m, port=9, formats=("8",), attributes=()
    )
    assert _with_media(sd, ()) == dataclasses.replace(sd, media=())


@pytest.mark.parametrize("value", ["IN IP4 192.0.2.1", "IN IP6 ::1", "IN IP4", "a b c d"])
def test_connection_memo_gives_the_parse_and_raises_every_time(value: str) -> None:
    for _ in range(2):
        try:
            expected: object = _connection.__wrapped__(value)
        except SdpError:
            with pytest.raises(SdpError):
                _connection(value)
        else:
            assert _connection(value) == expected


@pytest.mark.parametrize("value", ["0 0", "1 2", "0", "x 0"])
def test_timing_memo_gives_the_parse_and_raises_every_time(value: str) -> None:
    for _ in range(2):
        try:
            expected: object = _timing.__wrapped__(value)
        except SdpError:
            with pytest.raises(SdpError):
                _timing(value)
        else:
            assert _timing(value) == expected


def test_media_sections_build_what_the_lines_say() -> None:
    body = _audio("0 8", "i=info", "c=IN IP4 192.0.2.2", "b=AS:64", "k=clear:x", "a=sendrecv")
    (m,) = parse_sdp(body).media
    assert m == MediaDescription(
        "audio",
        4000,
        "RTP/AVP",
        ("0", "8"),
        connection=Connection("IN", "IP4", "192.0.2.2"),
        bandwidths=(Bandwidth("AS", 64),),
        attributes=(("sendrecv", None),),
        extra_head=(("i", "info"),),
        extra_tail=(("k", "clear:x"),),
    )
    assert parse_rtpmap("0 PCMU/8000") is parse_rtpmap("0 PCMU/8000")


def test_sdp_memos_keep_only_short_texts() -> None:
    """A hostile body's long lines are parsed like the rest but not remembered (each memo entry
    would otherwise pin up to a message's 16 KB)."""
    from sbc.sdp import model, parser

    for memo in (parser._attribute, parser._connection, parser._timing, model._rtpmap):
        memo.cache_clear()
    long = "x" * 300
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", f"c=IN IP4 h{long}", f"t=0 0{' ' * 300}"]
    lines += ["m=audio 4000 RTP/AVP 0", f"a=rtpmap:0 PCMU/8000{long}", f"a=zz:{long}", "a=sendrecv"]
    sd = parse_sdp(("\r\n".join(lines) + "\r\n").encode())
    assert sd.connection == Connection("IN", "IP4", f"h{long}") and sd.timings[0].stop == 0
    audio = sd.audio()
    assert audio is not None and audio.attributes == (
        ("rtpmap", f"0 PCMU/8000{long}"),
        ("zz", long),
        ("sendrecv", None),
    )
    assert audio.rtpmap(0) == STATIC_PAYLOAD_TYPES[0] and audio.rtpmap_table() == {}
    assert parse_rtpmap(f"0 PCMU/8000{long}") is None
    cached = [
        memo.cache_info().currsize
        for memo in (parser._attribute, parser._connection, parser._timing, model._rtpmap)
    ]
    assert cached == [1, 0, 0, 0]  # a=sendrecv only
