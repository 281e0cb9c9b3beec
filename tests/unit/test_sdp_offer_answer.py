"""Offer/answer rewriting (RFC 3264): codec filter, address rewrite, hold answers, negotiation."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.sdp.model import Connection, NoCommonCodec, SessionDescription
from sbc.sdp.offer_answer import (
    Codec,
    answer_for_hold,
    filter_codecs,
    negotiated,
    rewrite_connection,
    with_direction,
)
from sbc.sdp.parser import parse_sdp, serialize_sdp

ALLOWED = ("PCMU", "PCMA", "G722", "telephone-event")

OFFER = (
    "v=0\r\n"
    "o=3cxPS 1234 1234 IN IP4 192.168.1.10\r\n"
    "s=3cxPS Audio call\r\n"
    "c=IN IP4 192.168.1.10\r\n"
    "t=0 0\r\n"
    "m=audio 9000 RTP/AVP 8 0 9 18 96 101\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:18 G729/8000\r\n"
    "a=fmtp:18 annexb=no\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 useinbandfec=1\r\n"
    "a=rtcp-fb:96 nack\r\n"
    "a=rtcp-fb:* ccm fir\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)

ANSWER = (
    "v=0\r\n"
    "o=- 77 78 IN IP4 203.0.113.7\r\n"
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


def test_filter_keeps_allowed_codecs_in_offer_order_and_drops_their_lines() -> None:
    out = filter_codecs(parse_sdp(OFFER), ("pcmu", "PCMA", "g722", "TELEPHONE-EVENT"))
    m = out.media[0]
    assert m.formats == ("8", "0", "9", "101")
    body = serialize_sdp(out).decode()
    assert "G729" not in body
    assert "annexb" not in body
    assert "opus" not in body
    assert "useinbandfec" not in body
    assert "a=rtcp-fb:96" not in body
    assert "a=rtcp-fb:* ccm fir" in body  # names no payload type: kept
    assert "a=fmtp:101 0-15" in body
    assert "a=ptime:20" in body
    assert m.port == 9000


def test_filter_only_telephone_event_left_is_488() -> None:
    offer = parse_sdp(OFFER)
    with pytest.raises(NoCommonCodec) as info:
        filter_codecs(offer, ("telephone-event", "CN", "iLBC"))
    assert info.value.status == 488


def test_filter_disables_video_and_keeps_its_formats() -> None:
    body = OFFER + "m=video 9002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    out = filter_codecs(parse_sdp(body), ALLOWED)
    video = out.media[1]
    assert (video.port, video.formats) == (0, ("96",))
    assert out.media[0].port == 9000


def test_filter_disables_audio_stream_without_common_codec_if_another_is_usable() -> None:
    body = OFFER + "m=audio 9004 RTP/AVP 18\r\nm=audio 0 RTP/AVP 0\r\n"
    out = filter_codecs(parse_sdp(body), ALLOWED)
    assert [m.port for m in out.media] == [9000, 0, 0]
    assert out.media[1].formats == ("18",)


def test_filter_no_audio_at_all_is_488() -> None:
    body = "v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0 0\r\nm=video 5 RTP/AVP 31\r\n"
    with pytest.raises(NoCommonCodec):
        filter_codecs(parse_sdp(body), ALLOWED)


def test_filter_drops_dynamic_payload_type_without_rtpmap() -> None:
    body = "v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0 0\r\nm=audio 5 RTP/AVP 0 97\r\na=fmtp:97 x\r\n"
    out = filter_codecs(parse_sdp(body), ALLOWED)
    assert out.media[0].formats == ("0",)
    assert out.media[0].attributes == ()


def test_rewrite_connection_replaces_every_address_and_port() -> None:
    sd = parse_sdp(OFFER)
    sd = replace(
        sd,
        media=(
            replace(
                sd.media[0],
                connection=Connection("IN", "IP4", "192.168.1.10"),
                attributes=(
                    *sd.media[0].attributes,
                    ("rtcp", "9001 IN IP4 192.168.1.10"),
                    ("candidate", "1 1 UDP 1 192.168.1.10 9000 typ host"),
                ),
            ),
        ),
        attributes=(("ice-lite", None), ("tool", "3cx")),
    )
    out = rewrite_connection(sd, "198.51.100.5", [30000], bump_version=True)
    text = serialize_sdp(out).decode()
    assert "192.168.1.10" not in text
    assert out.origin.address == "198.51.100.5"
    assert out.origin.sess_version == 1235
    assert out.origin.username == "3cxPS"
    assert out.connection == Connection("IN", "IP4", "198.51.100.5")
    assert out.media[0].connection == Connection("IN", "IP4", "198.51.100.5")
    assert out.media[0].port == 30000
    assert out.media[0].attribute("rtcp") == "30001 IN IP4 198.51.100.5"
    assert out.media[0].attribute("candidate") is None
    assert out.attributes == (("tool", "3cx"),)


def test_rewrite_connection_ipv6_plain_rtcp_and_disabled_streams() -> None:
    body = OFFER.replace("a=sendrecv\r\n", "a=rtcp:9001\r\na=rtcp:bad\r\n") + (
        "m=video 0 RTP/AVP 31\r\n"
    )
    out = rewrite_connection(parse_sdp(body), "2001:db8::5", [40000, 40002])
    assert out.connection == Connection("IN", "IP6", "2001:db8::5")
    assert out.origin.addrtype == "IP6"
    assert out.origin.sess_version == 1234
    assert out.media[0].attribute("rtcp") == "40001"
    assert [v for k, v in out.media[0].attributes if k == "rtcp"] == ["40001"]
    assert out.media[0].connection is None
    assert out.media[1].port == 0


def test_rewrite_connection_port_count_mismatch_is_a_bug() -> None:
    with pytest.raises(ValueError):
        rewrite_connection(parse_sdp(OFFER), "1.2.3.4", [])


def test_with_direction_sets_media_and_clears_session_level() -> None:
    body = OFFER.replace("t=0 0\r\n", "t=0 0\r\na=recvonly\r\n")
    out = with_direction(parse_sdp(body), "sendonly")
    assert out.attributes == ()
    m = out.media[0]
    assert out.direction(m) == "sendonly"
    assert [k for k, v in m.attributes if v is None] == ["sendonly"]


def test_negotiated_reads_answer_codec_and_telephone_event() -> None:
    result = negotiated(parse_sdp(OFFER), parse_sdp(ANSWER))
    assert result.codecs == (Codec(9, "G722", 8000),)
    assert result.codec == Codec(9, "G722", 8000)
    assert result.telephone_event == Codec(101, "telephone-event", 8000, fmtp="0-16")
    assert result.ptime == 20
    assert result.direction == "sendrecv"


def test_negotiated_ignores_answer_codecs_not_offered_and_cn() -> None:
    answer = ANSWER.replace("RTP/AVP 9 101", "RTP/AVP 18 13 0 9 101 102").replace(
        "a=ptime:20\r\n", "a=rtpmap:102 telephone-event/16000\r\n"
    )
    offer = OFFER.replace(" 18 ", " 13 ")  # CN offered and answered: not a codec
    result = negotiated(parse_sdp(offer), parse_sdp(answer))
    assert [c.encoding for c in result.codecs] == ["PCMU", "G722"]
    assert result.telephone_event is not None
    assert result.telephone_event.payload_type == 101
    assert result.ptime is None


@pytest.mark.parametrize(
    "answer",
    [
        ANSWER.replace("m=audio 14022", "m=audio 0"),
        ANSWER.replace("RTP/AVP 9 101", "RTP/AVP 101"),
        ANSWER.replace("m=audio 14022 RTP/AVP 9 101", "m=audio 14022 RTP/AVP 96").replace(
            "a=rtpmap:9 G722/8000", "a=rtpmap:96 AMR/8000"
        ),
        "v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0 0\r\n",
    ],
)
def test_negotiated_without_common_codec_is_488(answer: str) -> None:
    with pytest.raises(NoCommonCodec):
        negotiated(parse_sdp(OFFER), parse_sdp(answer))


def test_negotiated_offer_without_audio_is_488() -> None:
    offer = "v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0 0\r\nm=audio 0 RTP/AVP 0\r\n"
    with pytest.raises(NoCommonCodec):
        negotiated(parse_sdp(offer), parse_sdp(ANSWER))


# The bridge's previous answer to the PBX: PCMA chosen, telephone-event 101.
PREVIOUS = (
    "v=0\r\n"
    "o=sbc 555 556 IN IP4 198.51.100.5\r\n"
    "s=sbc\r\n"
    "c=IN IP4 198.51.100.5\r\n"
    "t=0 0\r\n"
    "m=audio 30000 RTP/AVP 8 101\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)


def hold_answer(offer: str, **kwargs: object) -> SessionDescription:
    return answer_for_hold(
        parse_sdp(offer),
        "198.51.100.5",
        30000,
        session_version=557,
        previous=parse_sdp(kwargs.get("previous", PREVIOUS)),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("offered", "answered"),
    [
        ("sendonly", "recvonly"),
        ("recvonly", "sendonly"),
        ("inactive", "inactive"),
        ("sendrecv", "sendrecv"),
    ],
)
def test_hold_answer_mirrors_direction(offered: str, answered: str) -> None:
    out = hold_answer(OFFER.replace("a=sendrecv", f"a={offered}"))
    m = out.media[0]
    assert out.direction(m) == answered
    assert m.formats == ("8", "101")
    assert m.port == 30000
    assert out.connection == Connection("IN", "IP4", "198.51.100.5")
    assert (out.origin.username, out.origin.sess_id, out.origin.sess_version) == (
        "sbc",
        "555",
        557,
    )
    assert m.fmtp(101) == "0-15"
    assert m.ptime == 20


def test_hold_answer_rfc2543_hold_is_answered_recvonly() -> None:
    out = hold_answer(OFFER.replace("c=IN IP4 192.168.1.10", "c=IN IP4 0.0.0.0"))
    assert out.direction(out.media[0]) == "recvonly"
    # a valid body: it parses back to itself
    assert parse_sdp(serialize_sdp(out)) == out


def test_hold_answer_uses_offer_payload_type_numbers() -> None:
    offer = OFFER.replace("RTP/AVP 8 0 9 18 96 101", "RTP/AVP 0 100 97").replace(
        "a=rtpmap:8 PCMA/8000", "a=rtpmap:100 PCMA/8000\r\na=rtpmap:97 telephone-event/8000"
    )
    out = hold_answer(offer)
    m = out.media[0]
    assert m.formats == ("100", "97")
    assert m.rtpmap(100) is not None
    assert m.rtpmap(100).encoding == "PCMA"  # type: ignore[union-attr]


def test_hold_answer_rejects_extra_streams_with_port_zero() -> None:
    offer = OFFER + "m=video 9002 RTP/AVP 31\r\nm=audio 9004 RTP/AVP 8\r\n"
    out = hold_answer(offer)
    assert len(out.media) == 3
    assert [m.port for m in out.media] == [30000, 0, 0]
    assert out.media[1].formats == ("31",)


def test_hold_answer_when_codec_gone_is_488() -> None:
    with pytest.raises(NoCommonCodec):
        hold_answer(OFFER.replace("RTP/AVP 8 0 9 18 96 101", "RTP/AVP 0 101"))


def test_hold_answer_without_ptime_in_previous() -> None:
    out = hold_answer(OFFER, previous=PREVIOUS.replace("a=ptime:20\r\n", ""))
    assert out.media[0].ptime is None


@pytest.mark.parametrize(
    ("offer", "previous"),
    [
        (OFFER.replace("m=audio 9000", "m=audio 0"), PREVIOUS),
        (OFFER, PREVIOUS.replace("m=audio 30000", "m=audio 0")),
        (OFFER.replace("RTP/AVP 8 0 9 18 96 101", "TCP/MSRP *"), PREVIOUS),
    ],
)
def test_hold_answer_without_active_audio_is_488(offer: str, previous: str) -> None:
    with pytest.raises(NoCommonCodec):
        hold_answer(offer, previous=previous)


_codec_names = st.lists(
    st.sampled_from(["PCMU", "PCMA", "G722", "G729", "opus", "telephone-event", "CN", "GSM"]),
    unique=True,
    min_size=1,
)


@given(_codec_names, st.lists(st.sampled_from(["pcmu", "PCMA", "g722", "telephone-event"])))
@settings(max_examples=200)
def test_filter_result_is_ordered_subset_or_488(offered: list[str], allowed: list[str]) -> None:
    static = {"PCMU": 0, "PCMA": 8, "G722": 9, "G729": 18, "CN": 13, "GSM": 3}
    pts: list[int] = []
    lines: list[str] = []
    for index, name in enumerate(offered):
        pt = static.get(name, 100 + index)
        pts.append(pt)
        lines.append(f"a=rtpmap:{pt} {name}/8000\r\n")
    body = (
        "v=0\r\no=- 1 1 IN IP4 a\r\ns=-\r\nt=0 0\r\n"
        f"m=audio 5 RTP/AVP {' '.join(map(str, pts))}\r\n" + "".join(lines)
    )
    names = {a.casefold() for a in allowed}
    expected = [str(pt) for pt, n in zip(pts, offered, strict=True) if n.casefold() in names]
    real = [n for n in offered if n.casefold() in names and n not in ("telephone-event", "CN")]
    try:
        out = filter_codecs(parse_sdp(body), allowed)
    except NoCommonCodec:
        assert not real
        return
    assert real
    assert out.media[0].formats == tuple(expected)
    assert len([k for k, _ in out.media[0].attributes if k == "rtpmap"]) == len(expected)
