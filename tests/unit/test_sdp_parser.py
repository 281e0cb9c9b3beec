"""SDP parsing and serialization (RFC 8866): real-looking peer bodies, round trips, bad input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.sdp.model import (
    Bandwidth,
    Connection,
    MediaDescription,
    Origin,
    SdpError,
    SessionDescription,
    Timing,
)
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.errors import SipError

THREECX_OFFER = (
    "v=0\r\n"
    "o=3cxPS 1234 1234 IN IP4 192.168.1.10\r\n"
    "s=3cxPS Audio call\r\n"
    "c=IN IP4 192.168.1.10\r\n"
    "t=0 0\r\n"
    "m=audio 9000 RTP/AVP 8 0 9 18 101\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:18 G729/8000\r\n"
    "a=fmtp:18 annexb=no\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)

LIVEKIT_ANSWER = (
    "v=0\r\n"
    "o=- 3912345678 3912345679 IN IP4 203.0.113.7\r\n"
    "s=LiveKit\r\n"
    "c=IN IP4 203.0.113.7\r\n"
    "t=0 0\r\n"
    "m=audio 14022 RTP/AVP 9 101\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)


def test_parse_3cx_offer_fields() -> None:
    sd = parse_sdp(THREECX_OFFER.encode())
    assert sd.origin == Origin("3cxPS", "1234", 1234, "IN", "IP4", "192.168.1.10")
    assert sd.session_name == "3cxPS Audio call"
    assert sd.connection == Connection("IN", "IP4", "192.168.1.10")
    assert sd.timings == (Timing(0, 0),)
    (m,) = sd.media
    assert (m.media, m.port, m.proto) == ("audio", 9000, "RTP/AVP")
    assert m.formats == ("8", "0", "9", "18", "101")
    assert m.payload_types == (8, 0, 9, 18, 101)
    assert [c.encoding for c in m.codecs()] == ["PCMA", "PCMU", "G722", "G729", "telephone-event"]
    assert m.fmtp(101) == "0-15"
    assert m.fmtp(18) == "annexb=no"
    assert m.fmtp(8) is None
    assert m.ptime == 20
    assert sd.direction(m) == "sendrecv"
    assert m.attributes[-1] == ("sendrecv", None)


def test_3cx_offer_round_trips_byte_for_byte() -> None:
    assert serialize_sdp(parse_sdp(THREECX_OFFER)) == THREECX_OFFER.encode()


def test_livekit_answer_round_trips_and_reads() -> None:
    sd = parse_sdp(LIVEKIT_ANSWER)
    assert serialize_sdp(sd) == LIVEKIT_ANSWER.encode()
    assert sd.origin.username == "-"
    assert sd.origin.sess_version == 3912345679
    m = sd.media[0]
    assert [(c.payload_type, c.encoding, c.clock_rate) for c in m.codecs()] == [
        (9, "G722", 8000),
        (101, "telephone-event", 8000),
    ]


def test_lf_only_line_ends_and_blank_lines_accepted() -> None:
    lf = THREECX_OFFER.replace("\r\n", "\n") + "\n\n"
    assert parse_sdp(lf) == parse_sdp(THREECX_OFFER)
    assert serialize_sdp(parse_sdp(lf)) == THREECX_OFFER.encode()


def test_unknown_and_optional_lines_are_kept_in_order() -> None:
    body = (
        "v=0\r\n"
        "o=alice 1 2 IN IP6 ::1\r\n"
        "s= \r\n"
        "i=info\r\n"
        "u=http://example.com/\r\n"
        "e=a@example.com\r\n"
        "p=+1 555\r\n"
        "c=IN IP6 ::1\r\n"
        "b=AS:64\r\n"
        "t=3034423619 3042462419\r\n"
        "r=7d 1h 0 25h\r\n"
        "r=1d 1h 0\r\n"
        "t=0 0\r\n"
        "z=2882844526 -1h\r\n"
        "k=prompt\r\n"
        "y=unknown\r\n"
        "a=group:BUNDLE 0\r\n"
        "a=ice-lite\r\n"
        "m=audio 5004/2 RTP/SAVP 96\r\n"
        "i=media info\r\n"
        "c=IN IP6 ::2\r\n"
        "b=TIAS:64000\r\n"
        "k=clear:x\r\n"
        "x=vendor\r\n"
        "a=rtpmap:96 opus/48000/2\r\n"
        "a=fmtp:96\r\n"
        "a=empty:\r\n"
        "m=video 0 RTP/AVP 31\r\n"
        "m=application 9 UDP/BFCP *\r\n"
    )
    sd = parse_sdp(body)
    assert serialize_sdp(sd) == body.encode()
    assert sd.extra_head == (
        ("i", "info"),
        ("u", "http://example.com/"),
        ("e", "a@example.com"),
        ("p", "+1 555"),
    )
    assert sd.extra_tail == (("z", "2882844526 -1h"), ("k", "prompt"), ("y", "unknown"))
    assert sd.bandwidths == (Bandwidth("AS", 64),)
    assert sd.timings[0].repeats == ("7d 1h 0 25h", "1d 1h 0")
    audio = sd.media[0]
    assert audio.port_count == 2
    assert audio.extra_head == (("i", "media info"),)
    assert audio.extra_tail == (("k", "clear:x"), ("x", "vendor"))
    assert audio.rtpmap(96) is not None
    assert audio.rtpmap(96).channels == 2  # type: ignore[union-attr]
    assert audio.fmtp(96) == ""
    assert audio.attribute("empty") == ""
    assert sd.media[2].formats == ("*",)
    assert sd.media[2].payload_types == ()


def test_media_level_lines_before_any_connection_go_to_head() -> None:
    body = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\ni=x\r\nk=y\r\n"
    m = parse_sdp(body).media[0]
    assert m.extra_head == (("i", "x"), ("k", "y"))
    assert serialize_sdp(parse_sdp(body)) == body.encode()


def test_missing_timing_tolerated() -> None:
    sd = parse_sdp("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nm=audio 1 RTP/AVP 0\n")
    assert sd.timings == ()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"v=0\r\n",
        b"v=1\r\no=- 1 1 IN IP4 a\r\ns=-\r\n",
        b"o=- 1 1 IN IP4 a\r\nv=0\r\ns=-\r\n",
        b"v=0\r\ns=-\r\no=- 1 1 IN IP4 a\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\nt=0 0\r\n",
        b"v=0\r\no=- 1 x IN IP4 a\r\ns=-\r\n",
        b"v=0\r\no=- 1 1 IN IP4\r\ns=-\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nc=IN IP4\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nc=IN IP4 a\r\nc=IN IP4 b\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nb=AS\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nb=AS:x\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nb=A S:1\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nr=1d 1h 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nv=0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\na=\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\na=bad name:1\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 70000 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1/x RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP 128\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP pcmu\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP 0\r\nc=IN IP4 a\r\nc=IN IP4 b\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP 0\r\nt=0 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio 1 RTP/AVP 0\r\no=- 1 1 IN IP4 a\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nX=upper\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\na =x\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\na=x\ry\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\na=x\x00\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nm=audio \xd9\xa1 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 a\r\ns=\xff\r\n",
    ],
)
def test_malformed_input_raises_sdp_error_with_status_400(body: bytes) -> None:
    with pytest.raises(SdpError) as info:
        parse_sdp(body)
    assert info.value.status == 400
    assert isinstance(info.value, SipError)


@given(st.text(max_size=300))
@settings(max_examples=400)
def test_arbitrary_text_raises_nothing_but_sdp_error(text: str) -> None:
    with contextlib.suppress(SdpError):
        parse_sdp(text)


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_arbitrary_bytes_raise_nothing_but_sdp_error(data: bytes) -> None:
    with contextlib.suppress(SdpError):
        parse_sdp(b"v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\n" + data)


_sdp_line = st.tuples(
    st.sampled_from("vosicbtrzkamuepxyM "), st.sampled_from(["=", "", " ="]), st.text(max_size=40)
).map("".join)


@given(st.lists(_sdp_line, max_size=15), st.sampled_from(["\n", "\r\n"]))
@settings(max_examples=500)
def test_arbitrary_lines_after_header_parse_to_a_fixed_point_or_sdp_error(
    lines: list[str], eol: str
) -> None:
    body = eol.join(["v=0", "o=- 1 1 IN IP4 a", "s=-", *lines])
    try:
        sd = parse_sdp(body)
    except SdpError:
        return
    # Whatever parses serializes to something that parses back to the same description.
    assert parse_sdp(serialize_sdp(sd)) == sd


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_+", min_size=1, max_size=8)
_value = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x85"
    ),
    min_size=1,
    max_size=12,
)
_attr_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
_attributes = st.lists(
    st.tuples(_attr_name, st.none() | st.text(alphabet="abc 0123:/=-", max_size=10)), max_size=5
).map(tuple)
_connection = st.builds(Connection, st.just("IN"), st.sampled_from(["IP4", "IP6"]), _token)
_bandwidths = st.lists(
    st.builds(Bandwidth, st.sampled_from(["AS", "CT", "TIAS"]), st.integers(0, 10**6)), max_size=2
).map(tuple)


@st.composite
def _media(draw: st.DrawFn) -> MediaDescription:
    rtp = draw(st.booleans())
    formats = (
        draw(st.lists(st.integers(0, 127).map(str), min_size=1, max_size=5))
        if rtp
        else draw(st.lists(_token, min_size=1, max_size=3))
    )
    head = draw(st.lists(st.tuples(st.sampled_from(["i", "x"]), _value), max_size=2))
    has_conn_or_bw = draw(st.booleans())
    connection = draw(_connection) if has_conn_or_bw else None
    bandwidths = draw(_bandwidths) if has_conn_or_bw else ()
    tail = (
        draw(st.lists(st.tuples(st.sampled_from(["k", "y"]), _value), max_size=2))
        if connection is not None or bandwidths
        else []
    )
    return MediaDescription(
        media=draw(st.sampled_from(["audio", "video", "application"])),
        port=draw(st.integers(0, 65535)),
        proto="RTP/AVP" if rtp else draw(st.sampled_from(["UDP/BFCP", "TCP/MSRP"])),
        formats=tuple(formats),
        port_count=draw(st.none() | st.integers(1, 4)),
        connection=connection,
        bandwidths=bandwidths,
        attributes=draw(_attributes),
        extra_head=tuple(head),
        extra_tail=tuple(tail),
    )


@st.composite
def _descriptions(draw: st.DrawFn) -> SessionDescription:
    timings = draw(
        st.lists(
            st.builds(
                Timing,
                st.integers(0, 2**40),
                st.integers(0, 2**40),
                st.lists(_value, max_size=2).map(tuple),
            ),
            max_size=2,
        )
    )
    connection = draw(st.none() | _connection)
    bandwidths = draw(_bandwidths)
    head = draw(st.lists(st.tuples(st.sampled_from(["i", "u", "e", "p", "y"]), _value), max_size=3))
    tail = (
        draw(st.lists(st.tuples(st.sampled_from(["z", "k", "y"]), _value), max_size=3))
        if timings or connection is not None or bandwidths
        else []
    )
    return SessionDescription(
        origin=Origin(
            draw(_token), draw(_token), draw(st.integers(0, 2**63)), "IN", "IP4", draw(_token)
        ),
        session_name=draw(_value),
        connection=connection,
        bandwidths=bandwidths,
        timings=tuple(timings),
        attributes=draw(_attributes),
        media=tuple(draw(st.lists(_media(), max_size=3))),
        extra_head=tuple(head),
        extra_tail=tuple(tail),
    )


@given(_descriptions())
@settings(max_examples=300)
def test_round_trip_of_generated_descriptions(sd: SessionDescription) -> None:
    body = serialize_sdp(sd)
    assert body.endswith(b"\r\n")
    assert parse_sdp(body) == sd
    assert serialize_sdp(parse_sdp(body)) == body
