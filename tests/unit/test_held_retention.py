"""What a held call lets go of once it is up (issue 12, bytes per held call measured by
bench/bench_held.py): leg a's INVITE is cut to the fields a response to it needs, and the
responses built from what is kept are the bytes the whole INVITE gives; the flow holds no
fact it served while it waits; the SDP parser shares the values of repeated lines."""

from __future__ import annotations

import asyncio
from types import CoroutineType
from typing import Any

import pytest

from sbc.b2bua.callstate import AckSettled
from sbc.sdp.model import SdpError
from sbc.sdp.parser import _parse_attribute, parse_sdp
from sbc.sip.serializer import serialize
from sbc.sip.transaction import build_response
from tests.unit.call_harness import PBX_SDP, Harness, a_invite, answer_bye


async def hang_up(h: Harness) -> None:
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


async def test_a_held_call_keeps_only_what_answers_its_invite() -> None:
    invite = a_invite(("Session-Expires", "1800;refresher=uac"), ("Supported", "timer"))
    h = Harness(invite=invite)
    await h.connect()
    await asyncio.sleep(0)
    call = h.call
    slim = call.a_invite
    assert call.incoming.request is slim  # one copy, the call's and leg a's
    assert slim.body == b"" and invite.body == PBX_SDP
    assert (slim.method, slim.uri, slim.version) == (invite.method, invite.uri, invite.version)
    kept = {name for name, _ in slim.headers.items()}
    assert kept == {"Via", "From", "To", "Call-ID", "CSeq", "Record-Route", "Allow"}
    for name in kept:
        assert slim.headers.get_all(name) == invite.headers.get_all(name)
    # Any response to it (a 2xx copy, a late refusal path) is the same bytes either way.
    tag = call.incoming.local_tag
    for status in (100, 200, 500):
        extra = (("Contact", "<sip:x@192.0.2.1>"),)
        assert serialize(build_response(slim, status, to_tag=tag, headers=extra)) == serialize(
            build_response(invite, status, to_tag=tag, headers=extra)
        )
    assert call._last_provisional is None and call._last_relayed is None
    await hang_up(h)


def _frames_locals(coro: Any) -> list[dict[str, Any]]:
    found = []
    while isinstance(coro, CoroutineType) and coro.cr_frame is not None:
        found.append(coro.cr_frame.f_locals)
        coro = coro.cr_await
    return found


async def test_the_talk_loop_holds_no_fact_while_it_waits() -> None:
    h = Harness()
    await h.connect()
    await asyncio.sleep(0)
    frames = _frames_locals(h.task.get_coro())
    assert any("fact" in f for f in frames)  # the talk loop is among them
    held = [value for f in frames for value in f.values() if isinstance(value, AckSettled)]
    assert held == [], "the ACK served last is still held while the call waits"
    await hang_up(h)


def test_sdp_values_of_repeated_lines_are_shared_and_equal_to_a_fresh_parse() -> None:
    first, second = parse_sdp(PBX_SDP), parse_sdp(PBX_SDP)
    assert first == second
    audio_1, audio_2 = first.audio(), second.audio()
    assert audio_1 is not None and audio_2 is not None
    assert audio_1.attributes and all(
        a is b for a, b in zip(audio_1.attributes, audio_2.attributes, strict=True)
    )
    assert first.connection is not None and first.connection is second.connection
    for value in ("rtpmap:0 PCMU/8000", "sendrecv", "fmtp:101 0-16", "x:"):
        assert parse_sdp(f"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\na={value}\r\n").attributes == (
            _parse_attribute(value),
        )
    # A line that does not parse is refused every time (nothing remembered for it).
    for _ in range(2):
        with pytest.raises(SdpError):
            parse_sdp("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\na=bad name\r\n")
