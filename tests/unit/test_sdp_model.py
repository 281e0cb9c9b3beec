"""Accessors of the SDP model: rtpmap (static and dynamic), fmtp, direction, ptime, rtcp."""

from __future__ import annotations

import pytest

from sbc.sdp.model import (
    STATIC_PAYLOAD_TYPES,
    RtcpAddress,
    RtpMap,
    parse_rtcp,
    parse_rtpmap,
)
from sbc.sdp.parser import parse_sdp

HEAD = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\n"


def sdp(session: str = "c=IN IP4 10.0.0.1\r\nt=0 0\r\n", media: str = "") -> str:
    return HEAD + session + "m=audio 4000 RTP/AVP 0 8 9 18 3 13 96 101\r\n" + media


@pytest.mark.parametrize(
    ("pt", "expected"),
    [
        (0, RtpMap(0, "PCMU", 8000)),
        (8, RtpMap(8, "PCMA", 8000)),
        (9, RtpMap(9, "G722", 8000)),
        (18, RtpMap(18, "G729", 8000)),
        (3, RtpMap(3, "GSM", 8000)),
        (13, RtpMap(13, "CN", 8000)),
        (96, None),
    ],
)
def test_static_payload_types_need_no_rtpmap(pt: int, expected: RtpMap | None) -> None:
    m = parse_sdp(sdp()).media[0]
    assert m.rtpmap(pt) == expected


def test_rtpmap_line_overrides_static_and_defines_dynamic() -> None:
    m = parse_sdp(
        sdp(
            media="a=rtpmap:0 pcmu/8000\r\na=rtpmap:96 opus/48000/2\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=rtpmap:bad\r\n"
        )
    ).media[0]
    assert m.rtpmap(0) == RtpMap(0, "pcmu", 8000)
    assert m.rtpmap(96) == RtpMap(96, "opus", 48000, 2)
    assert m.rtpmap(101) == RtpMap(101, "telephone-event", 8000)
    assert [c.payload_type for c in m.codecs()] == [0, 8, 9, 18, 3, 13, 96, 101]
    assert RtpMap(96, "opus", 48000, 2).value == "96 opus/48000/2"
    assert RtpMap(0, "PCMU", 8000).value == "0 PCMU/8000"
    assert STATIC_PAYLOAD_TYPES[10].channels == 2


@pytest.mark.parametrize(
    "value",
    ["", "x PCMU/8000", "0 PCMU", "0 PCMU/x", "0 /8000", "0 PCMU/8000/1/2", "0 PCMU/8000/x"],
)
def test_parse_rtpmap_rejects_malformed(value: str) -> None:
    assert parse_rtpmap(value) is None


def test_parse_rtpmap_tolerates_extra_spaces() -> None:
    assert parse_rtpmap(" 8  PCMA/8000 ") == RtpMap(8, "PCMA", 8000)


def test_fmtp_lookup_by_payload_type() -> None:
    m = parse_sdp(sdp(media="a=fmtp:101 0-11,16\r\na=fmtp:18 annexb=no\r\na=fmtp\r\n")).media[0]
    assert m.fmtp(101) == "0-11,16"
    assert m.fmtp(18) == "annexb=no"
    assert m.fmtp(1) is None


@pytest.mark.parametrize(("value", "expected"), [("20", 20), ("30.0", 30), ("x", None)])
def test_ptime(value: str, expected: int | None) -> None:
    m = parse_sdp(sdp(media=f"a=ptime:{value}\r\n")).media[0]
    assert m.ptime == expected


def test_ptime_absent() -> None:
    assert parse_sdp(sdp()).media[0].ptime is None


@pytest.mark.parametrize(
    ("session_attr", "media_attr", "expected"),
    [
        ("", "", "sendrecv"),
        ("a=sendonly\r\n", "", "sendonly"),
        ("a=recvonly\r\n", "", "recvonly"),
        ("a=inactive\r\n", "", "inactive"),
        ("a=inactive\r\n", "a=sendrecv\r\n", "sendrecv"),
        ("a=sendrecv\r\n", "a=sendonly\r\n", "sendonly"),
        ("", "a=recvonly\r\n", "recvonly"),
        ("a=sendonly:x\r\n", "", "sendrecv"),  # a value attribute is not a direction
    ],
)
def test_direction_media_level_overrides_session_level(
    session_attr: str, media_attr: str, expected: str
) -> None:
    sd = parse_sdp(sdp("c=IN IP4 10.0.0.1\r\nt=0 0\r\n" + session_attr, media_attr))
    assert sd.direction(sd.media[0]) == expected


@pytest.mark.parametrize(
    ("media", "expected"),
    [
        ("", "sendonly"),
        ("a=sendrecv\r\n", "sendonly"),
        ("a=recvonly\r\n", "inactive"),
        ("a=sendonly\r\n", "sendonly"),
        ("a=inactive\r\n", "inactive"),
    ],
)
def test_rfc2543_hold_connection_address(media: str, expected: str) -> None:
    sd = parse_sdp(sdp("c=IN IP4 0.0.0.0\r\nt=0 0\r\n", media))
    assert sd.direction(sd.media[0]) == expected


def test_media_connection_overrides_session_connection_for_hold() -> None:
    sd = parse_sdp(sdp("c=IN IP4 0.0.0.0\r\nt=0 0\r\n", "c=IN IP4 10.0.0.2\r\n"))
    m = sd.media[0]
    assert sd.connection_for(m) is not None
    assert sd.connection_for(m).address == "10.0.0.2"  # type: ignore[union-attr]
    assert sd.direction(m) == "sendrecv"
    ipv6 = parse_sdp(sdp("c=IN IP6 ::\r\nt=0 0\r\n"))
    assert ipv6.direction(ipv6.media[0]) == "sendonly"


def test_direction_without_any_connection() -> None:
    sd = parse_sdp(HEAD + "t=0 0\r\nm=audio 1 RTP/AVP 0\r\n")
    assert sd.direction(sd.media[0]) == "sendrecv"


def test_rtcp_attribute_rfc3605() -> None:
    m = parse_sdp(sdp(media="a=rtcp:53020 IN IP4 126.16.64.4\r\na=rtcp-mux\r\n")).media[0]
    assert m.rtcp == RtcpAddress(53020, "IN", "IP4", "126.16.64.4")
    assert m.rtcp_mux
    plain = parse_sdp(sdp(media="a=rtcp:4001\r\n")).media[0]
    assert plain.rtcp == RtcpAddress(4001)
    assert not plain.rtcp_mux
    assert parse_sdp(sdp()).media[0].rtcp is None
    assert parse_sdp(sdp(media="a=rtcp:x\r\n")).media[0].rtcp is None


@pytest.mark.parametrize("value", ["", "x", "1 IN IP4", "1 IN"])
def test_parse_rtcp_rejects_malformed(value: str) -> None:
    assert parse_rtcp(value) is None


def test_audio_skips_disabled_and_non_audio_streams() -> None:
    sd = parse_sdp(
        HEAD
        + "t=0 0\r\nm=video 5000 RTP/AVP 31\r\nm=audio 0 RTP/AVP 0\r\nm=audio 6000 RTP/AVP 8\r\n"
    )
    audio = sd.audio()
    assert audio is not None
    assert audio.port == 6000
    none = parse_sdp(HEAD + "t=0 0\r\nm=video 5000 RTP/AVP 31\r\n")
    assert none.audio() is None


def test_session_attribute_lookup() -> None:
    sd = parse_sdp(HEAD + "t=0 0\r\na=tool:x\r\na=flag\r\n")
    assert sd.attribute("tool") == "x"
    assert sd.attribute("flag") is None
    assert sd.attribute("missing") is None
