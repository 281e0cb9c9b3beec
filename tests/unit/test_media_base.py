"""The media interface's shared SDP handling, through the passthrough backend (no sockets)."""

from __future__ import annotations

import pytest

from sbc.media.base import (
    SIDES,
    PassthroughBackend,
    audio_ports,
    media_address,
    other_side,
    rtcp_address,
)
from sbc.sdp.model import NoCommonCodec
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.errors import RequestPending

PBX_OFFER = (
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
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)

RETELL_ANSWER = (
    "v=0\r\n"
    "o=- 77 78 IN IP4 203.0.113.7\r\n"
    "s=LiveKit\r\n"
    "c=IN IP4 203.0.113.7\r\n"
    "t=0 0\r\n"
    "m=audio 14022 RTP/AVP 9 101\r\n"
    "a=rtpmap:9 G722/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)


def test_side_helpers() -> None:
    assert SIDES == ("a", "b")
    assert other_side("a") == "b"
    assert other_side("b") == "a"


def test_media_and_rtcp_addresses_from_sdp() -> None:
    sd = parse_sdp(PBX_OFFER)
    assert media_address(sd) == ("192.168.1.10", 9000)
    assert rtcp_address(sd) == ("192.168.1.10", 9001)
    with_rtcp = parse_sdp(PBX_OFFER + "a=rtcp:9005\r\n")
    assert rtcp_address(with_rtcp) == ("192.168.1.10", 9005)
    with_rtcp_addr = parse_sdp(PBX_OFFER + "a=rtcp:9005 IN IP4 10.1.1.1\r\n")
    assert rtcp_address(with_rtcp_addr) == ("10.1.1.1", 9005)
    muxed = parse_sdp(PBX_OFFER + "a=rtcp-mux\r\n")
    assert rtcp_address(muxed) == ("192.168.1.10", 9000)
    held = parse_sdp(PBX_OFFER.replace("c=IN IP4 192.168.1.10", "c=IN IP4 0.0.0.0"))
    assert media_address(held) is None
    assert rtcp_address(held) is None
    no_conn = parse_sdp(PBX_OFFER.replace("c=IN IP4 192.168.1.10\r\n", ""))
    assert media_address(no_conn) is None
    no_audio = parse_sdp(PBX_OFFER.replace("m=audio 9000", "m=audio 0"))
    assert media_address(no_audio) is None
    assert audio_ports(no_audio, 5) == [0]
    multicast = parse_sdp(PBX_OFFER.replace("c=IN IP4 192.168.1.10", "c=IN IP4 224.2.1.1/127"))
    assert media_address(multicast) == ("224.2.1.1", 9000)


def test_audio_ports_puts_the_port_on_the_first_active_audio_stream_only() -> None:
    sd = parse_sdp(PBX_OFFER + "m=video 9002 RTP/AVP 31\r\nm=audio 9004 RTP/AVP 0\r\n")
    assert audio_ports(sd, 40000) == [40000, 0, 0]


async def test_passthrough_filters_codecs_and_keeps_addresses() -> None:
    session = await PassthroughBackend().allocate("call-1")
    to_retell = await session.offer("a", parse_sdp(PBX_OFFER))
    m = to_retell.media[0]
    assert m.formats == ("8", "0", "9", "101")
    assert (to_retell.connection_for(m).address, m.port) == ("192.168.1.10", 9000)  # type: ignore[union-attr]
    assert to_retell.origin.username == "sbc"
    assert to_retell.origin.address == "192.168.1.10"
    to_pbx = await session.answer("b", parse_sdp(RETELL_ANSWER))
    assert media_address(to_pbx) == ("203.0.113.7", 14022)
    assert to_pbx.origin.username == "sbc"
    assert session.last_activity("a") is None
    assert session.stats() == {"backend": "passthrough", "call_id": "call-1", "sides": {}}
    # The PBX is told to send to Retell directly: that is its local endpoint.
    assert session.local_endpoint("a") == ("203.0.113.7", 14022)
    await session.close()
    await session.close()
    assert session.closed
    with pytest.raises(RuntimeError):
        await session.offer("a", parse_sdp(PBX_OFFER))
    with pytest.raises(RuntimeError):
        await session.answer("b", parse_sdp(RETELL_ANSWER))
    await PassthroughBackend().close()


async def test_passthrough_offer_without_common_codec_is_488() -> None:
    session = await PassthroughBackend(codecs=("AMR",)).allocate("c")
    with pytest.raises(NoCommonCodec):
        await session.offer("a", parse_sdp(PBX_OFFER))


async def test_version_increments_exactly_when_the_sdp_sent_on_a_side_changes() -> None:
    session = await PassthroughBackend().allocate("c")
    first = await session.offer("a", parse_sdp(PBX_OFFER))
    again = await session.offer("a", parse_sdp(PBX_OFFER))
    assert again.origin == first.origin  # identical SDP: same version (RFC 3264 §8)
    changed = await session.offer("a", parse_sdp(PBX_OFFER.replace("9000", "9010")))
    assert changed.origin.sess_version == first.origin.sess_version + 1
    assert changed.origin.sess_id == first.origin.sess_id
    assert changed.origin.username == "sbc"


async def test_reoffer_hold_is_answered_locally_with_mirrored_direction() -> None:
    session = await PassthroughBackend().allocate("c")
    with pytest.raises(RequestPending):
        await session.reoffer("a", parse_sdp(PBX_OFFER))
    await session.offer("a", parse_sdp(PBX_OFFER))
    answer = await session.answer("b", parse_sdp(RETELL_ANSWER))
    hold = parse_sdp(
        PBX_OFFER.replace("a=sendrecv", "a=sendonly").replace("1234 1234", "1234 1235")
    )
    reply = await session.reoffer("a", hold)
    m = reply.media[0]
    assert reply.direction(m) == "recvonly"
    assert m.formats == ("9", "101")  # the negotiated codec, with the offer's numbers
    assert media_address(reply) == ("203.0.113.7", 14022)
    assert reply.origin.sess_id == answer.origin.sess_id
    assert reply.origin.sess_version == answer.origin.sess_version + 1
    # Same hold offer again (refresh): identical answer, same version.
    again = await session.reoffer("a", hold)
    assert again == reply
    resume = await session.reoffer("a", parse_sdp(PBX_OFFER))
    assert resume.direction(resume.media[0]) == "sendrecv"
    assert resume.origin.sess_version == reply.origin.sess_version + 1
    assert b"a=sendrecv" in serialize_sdp(resume)
