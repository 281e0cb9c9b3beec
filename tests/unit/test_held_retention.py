"""What a held call lets go of once it is up (issue 12, bytes per held call measured by
bench/bench_held.py and bench/bench_held_service.py): leg a's INVITE is cut to the fields the
call reads later, once nothing can answer it any more; the flow holds no fact it served while
it waits; the SDP parser shares the values of repeated lines."""

from __future__ import annotations

import asyncio
from types import CoroutineType
from typing import Any

import pytest

from sbc.b2bua.callstate import AckSettled
from sbc.sdp import parser as sdp_parser
from sbc.sdp.model import MEMO_MAX_TEXT, SdpError
from sbc.sdp.parser import _parse_attribute, parse_sdp
from tests.unit.call_harness import PBX_SDP, Harness, a_invite, answer_bye


async def hang_up(h: Harness) -> None:
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


async def test_a_held_call_keeps_only_what_it_reads_of_its_invite() -> None:
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
    assert kept == {"Call-ID", "Allow"}
    for name in kept:
        assert slim.headers.get_all(name) == invite.headers.get_all(name)
    # The same objects, not copies (a held call keeps them for hours); the PBX's Allow is one
    # field for all its calls.
    assert slim.call_id is invite.call_id is call.origin.call_id
    other = Harness(invite=a_invite(("Session-Expires", "1800;refresher=uac")))
    await other.connect()
    await asyncio.sleep(0)
    (allow,) = [item for item in slim.headers.items() if item[0] == "Allow"]
    (again,) = [item for item in other.call.a_invite.headers.items() if item[0] == "Allow"]
    assert again is allow
    await hang_up(other)
    # Nothing answers leg a's INVITE any more: its final response went, so a response is
    # never built from what was cut (Via, From, To, CSeq).
    assert call.incoming.final_sent
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


def _body(sess_id: int, port: int, username: str = "3cxPS", formats: str = "8 0 101") -> str:
    return (
        f"v=0\r\no={username} {sess_id} {sess_id} IN IP4 10.0.0.1\r\ns=call\r\n"
        f"c=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP {formats}\r\n"
        "a=rtpmap:8 PCMA/8000\r\na=sendrecv\r\n"
    )


def test_sdp_parts_that_repeat_across_calls_are_shared() -> None:
    """Two calls' SDPs from one peer differ in session id and port only: the rest of the o=
    and m= lines, the attribute and timing tuples are one object each (a held call's session
    keeps them), and every value is what a parse without the memos gives."""
    first, second = parse_sdp(_body(1001, 10000)), parse_sdp(_body(2002, 10002))
    assert (first.origin.sess_id, second.origin.sess_id) == ("1001", "2002")
    for name in ("username", "nettype", "addrtype", "address"):
        assert getattr(first.origin, name) is getattr(second.origin, name)
    m1, m2 = first.media[0], second.media[0]
    assert (m1.port, m2.port) == (10000, 10002)
    assert m1.formats == ("8", "0", "101") and m1.formats is m2.formats
    assert m1.media is m2.media and m1.proto is m2.proto
    assert m1.attributes is m2.attributes and first.timings is second.timings
    # Lines longer than the memos take are parsed each time, to the same values.
    long_name = "u" * (MEMO_MAX_TEXT + 1)
    wide = parse_sdp(_body(7, 9, username=long_name))
    assert wide.origin.username == long_name and wide.origin.address == "10.0.0.1"
    many = " ".join(str(n % 128) for n in range(MEMO_MAX_TEXT // 2))
    assert parse_sdp(_body(7, 9, formats=many)).media[0].formats == tuple(many.split())
    # m= errors are raised every time, memo or not (the last line is too long for it).
    for line in (
        "m=audio 9 RTP/AVP",
        "m=audio 9",
        "m=audio 9 RTP/AVP 128",
        f"m=a 9 RTP/AVP {many} x",
    ):
        for _ in range(2):
            with pytest.raises(SdpError):
                parse_sdp(f"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n{line}\r\n")


def test_the_shared_tuples_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdp_parser, "_TUPLES", {})
    monkeypatch.setattr(sdp_parser, "_TUPLES_MAX", 2)
    bodies = [_body(1, 9).replace("sendrecv", direction) for direction in ("sendonly", "recvonly")]
    for body in bodies * 2:
        parsed = parse_sdp(body)
        assert parsed.media[0].attributes == parse_sdp(body).media[0].attributes
        assert len(sdp_parser._TUPLES) <= 2
