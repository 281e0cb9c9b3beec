"""The call flow (sbc.b2bua.call) against a scripted engine: no sockets, every message checked.

Timers are real but tiny (T1 = 5 ms); every wait is bounded. ``call_harness.py`` has the
engine and the harness; ``test_call_timers.py`` runs realistic timers on a fake clock.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import structlog

from sbc.b2bua.call import CallState
from sbc.media.base import MediaSession, PassthroughBackend, PassthroughSession, Side
from sbc.sip.errors import ServiceUnavailable
from sbc.sip.message import Request
from sbc.sip.server_transaction import build_response
from tests.unit.call_harness import (
    LIMIT,
    PBX_SDP,
    RETELL_SDP,
    FakeEngine,
    Harness,
    a_invite,
    answer_bye,
)

# -- set-up --------------------------------------------------------------------------------------


async def test_bridged_call_pbx_hangs_up() -> None:
    h = Harness()
    invite = await h.b_invite()
    b = invite.request
    assert str(b.uri) == "sip:+14155550100@retell.test:5060;transport=tcp"
    assert b.headers.get("X-Caller-Number") == "+442071234567"
    assert b.headers.get("X-Customer-Id") == "C-9"
    assert b.call_id != "pbx-call@10.0.0.1" and "Record-Route" not in b.headers
    assert h.state() is CallState.CALLING

    invite.deliver(100)
    invite.deliver(180)
    invite.deliver(180)  # LiveKit repeats it every second: relayed once
    ringing = await h.pbx_status(180)
    assert ringing.to_tag == h.call.caller_leg.local_tag
    assert ringing.headers.get("Record-Route") == "<sip:10.0.0.1;lr>"
    assert h.state() is CallState.RINGING

    invite.deliver(200, body=RETELL_SDP)
    ok = await h.pbx_status(200)
    assert h.statuses() == [180, 200]
    assert b"c=IN IP4 192.0.2.9" in ok.body
    assert ok.headers.get("Contact") == "<sip:101@10.0.0.5:5060>"
    await h.engine.wait(lambda: h.engine.acks)
    (ack,) = h.engine.acks
    assert str(ack.uri) == "sip:retell@192.0.2.9:5060;transport=TCP"
    assert ack.cseq.seq == 1 and ack.cseq.method == "ACK"
    assert h.state() is CallState.ANSWERED

    h.pbx_ack(1)
    await asyncio.wait_for(h.call.up.wait(), LIMIT)
    bye = h.send_pbx(h.pbx_request("BYE", 2))
    await answer_bye(h.engine)
    await h.finished()
    assert bye.final_sent
    assert h.state() is CallState.ENDED
    assert h.call.end_reason == "pbx_bye"
    (retell_bye,) = h.engine.requests("BYE")
    assert retell_bye.request.call_id == b.call_id
    assert retell_bye.request.cseq.seq == 2


async def test_retell_hangs_up_and_3cx_challenges_the_bye() -> None:
    h = Harness()
    invite = await h.connect()
    h.send_retell("BYE", 1, invite)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    first = h.engine.requests("BYE")[0]
    assert str(first.request.uri) == "sip:3cx@10.0.0.1:5060"
    assert first.request.headers.get("Route") == "<sip:10.0.0.1;lr>"
    challenge = build_response(
        first.request,
        407,
        headers=[
            ("Proxy-Authenticate", 'Digest realm="3CXPhoneSystem", nonce="n1", algorithm=MD5')
        ],
    )
    first.responses.append(challenge)
    first.final = challenge
    first._changed.set()
    second = await answer_bye(h.engine, 1)
    await h.finished()
    assert second.request.cseq.seq == first.request.cseq.seq + 1
    assert 'username="6001auth"' in (second.request.headers.get("Proxy-Authorization") or "")
    assert h.call.end_reason == "retell_bye"


@pytest.mark.parametrize(("retell", "pbx"), [(486, 486), (603, 603), (404, 480), (503, 503)])
async def test_retell_failure_is_mapped(retell: int, pbx: int) -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.deliver(retell)
    await h.finished()
    assert h.statuses() == [pbx]
    assert (h.call.pbx_status, h.call.retell_status) == (pbx, retell)


async def test_no_common_codec_is_488_and_nothing_is_sent() -> None:
    g729 = PBX_SDP.replace(b"RTP/AVP 8 0 101", b"RTP/AVP 18").replace(b"PCMA", b"G729")
    h = Harness(invite=a_invite(body=g729))
    await h.finished()
    assert h.statuses() == [488]
    assert h.engine.handles == []


async def test_late_offer_takes_the_offer_from_retell_and_the_answer_from_the_ack() -> None:
    # RFC 3264 §5 / RFC 3261 §13.2.1: an INVITE without SDP gets the offer in the 2xx and
    # answers in the ACK; sbc carries both across.
    h = Harness(invite=a_invite(body=b""))
    invite = await h.b_invite()
    assert invite.request.body == b""
    assert "Content-Type" not in invite.request.headers
    invite.deliver(200, body=RETELL_SDP)
    ok = await h.pbx_status(200)
    assert b"m=audio 40000 RTP/AVP 8 101" in ok.body  # Retell's offer, to the PBX
    assert h.engine.acks == []  # Retell's ACK waits for the PBX's answer
    ack = h.pbx_request("ACK", 1, body=PBX_SDP.replace(b"RTP/AVP 8 0 101", b"RTP/AVP 8 101"))
    h.call.ack_arrived(h.call.caller_leg, ack)
    await h.engine.wait(lambda: h.engine.acks)
    (b_ack,) = h.engine.acks
    assert b_ack.headers.get("Content-Type") == "application/sdp"
    assert b"c=IN IP4 10.0.0.1" in b_ack.body and b"m=audio 9000 RTP/AVP 8 101" in b_ack.body
    await asyncio.wait_for(h.call.up.wait(), 1)
    h.send_pbx(h.pbx_request("BYE", 2))
    await answer_bye(h.engine)
    await h.finished()
    assert h.call.end_reason == "pbx_bye"


async def test_late_offer_without_an_answer_in_the_ack_ends_both_legs() -> None:
    h = Harness(invite=a_invite(body=b""))
    invite = await h.b_invite()
    invite.deliver(200, body=RETELL_SDP)
    await h.pbx_status(200)
    h.call.ack_arrived(h.call.caller_leg, h.pbx_request("ACK", 1))
    await h.engine.wait(lambda: h.engine.acks and h.engine.requests("BYE"))
    assert h.engine.acks[0].body == b""  # Retell's 2xx is ACKed all the same, then BYE
    await h.engine.wait(lambda: len(h.engine.requests("BYE")) == 2)
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "pbx_no_ack"


async def test_session_interval_too_small_is_422() -> None:
    h = Harness(invite=a_invite(("Session-Expires", "30"), ("Supported", "timer")))
    await h.finished()
    (response,) = h.engine.to_pbx
    assert response.status == 422
    assert response.headers.get("Min-SE") == "90"


# -- cancel, timeout, shutdown ---------------------------------------------------------------------


async def test_pbx_cancel_waits_for_a_provisional_before_cancelling() -> None:
    h = Harness()
    invite = await h.b_invite()
    h.call.cancelled(h.call.caller_leg)
    await h.pbx_status(487)
    assert h.engine.cancelled == []  # RFC 3261 §9.1: not before a provisional response
    invite.deliver(100)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)
    await h.finished()
    assert h.call.end_reason == "pbx_cancel"
    assert h.engine.requests("BYE") == []


async def test_cancel_crossing_a_200_is_acked_then_byed() -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    h.call.cancelled(h.call.caller_leg)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(200, body=RETELL_SDP)
    await answer_bye(h.engine)
    await h.finished()
    assert len(h.engine.acks) == 1
    assert h.statuses() == [180, 487]
    assert h.call.retell_status == 200


async def test_answer_timeout_gives_the_pbx_480_and_cancels_retell() -> None:
    h = Harness(answer_timeout=0.05)
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(480)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)
    await h.finished()
    assert h.call.end_reason == "answer_timeout"


async def test_cancel_never_answered_gives_up_after_64_t1() -> None:
    h = Harness(answer_timeout=0.02)
    invite = await h.b_invite()
    invite.deliver(180)
    await h.finished()  # 64 * T1 = 0.32 s without a final response
    assert h.statuses() == [180, 480]
    assert h.state() is CallState.ENDED


async def test_shutdown_while_ringing() -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    h.call.shutdown()
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)
    await h.finished()
    assert h.statuses() == [180, 503]


async def test_shutdown_when_connected_hangs_up_both() -> None:
    h = Harness()
    await h.connect()
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert {b.request.call_id for b in h.engine.requests("BYE")} == {
        "pbx-call@10.0.0.1",
        h.call.agent_leg.call_id,
    }


# -- after the answer --------------------------------------------------------------------------


async def test_missing_ack_repeats_the_200_then_hangs_up() -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.deliver(200, body=RETELL_SDP)
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.statuses().count(200) > 3  # RFC 3261 §13.3.1.4: T1, 2*T1, ... capped at T2
    assert h.call.end_reason == "pbx_no_ack"


async def test_hold_reinvite_is_answered_here() -> None:
    h = Harness()
    await h.connect()
    hold = PBX_SDP.replace(b"a=sendrecv", b"a=sendonly").replace(b"1 1 IN", b"1 2 IN")
    reinvite = h.send_pbx(h.pbx_request("INVITE", 2, body=hold))
    await h.engine.wait(lambda: reinvite.final_sent)
    ok = h.engine.to_pbx[-1]
    assert ok.status == 200 and b"a=recvonly" in ok.body
    glare = h.send_pbx(h.pbx_request("INVITE", 3, body=hold))
    await h.engine.wait(lambda: glare.final_sent)
    assert h.engine.to_pbx[-1].status == 491  # RFC 3261 §14.2
    h.pbx_ack(2)
    assert [x.request.method for x in h.engine.handles] == ["INVITE"]  # nothing to Retell
    h.send_pbx(h.pbx_request("BYE", 4))
    await answer_bye(h.engine)
    await h.finished()


async def test_update_refresh_info_and_options_are_answered_here() -> None:
    h = Harness()
    await h.connect()
    update = h.send_pbx(h.pbx_request("UPDATE", 2, ("Session-Expires", "120;refresher=uac")))
    await h.engine.wait(lambda: update.final_sent)
    ok = h.engine.to_pbx[-1]
    assert ok.headers.get("Session-Expires") == "120;refresher=uas"  # no Supported: timer
    short = h.send_pbx(h.pbx_request("UPDATE", 3, ("Session-Expires", "10")))
    await h.engine.wait(lambda: short.final_sent)
    assert h.engine.to_pbx[-1].status == 422
    info = h.send_pbx(h.pbx_request("INFO", 4, body=b""))
    await h.engine.wait(lambda: info.final_sent)
    assert h.engine.to_pbx[-1].status == 200
    options = h.send_pbx(h.pbx_request("OPTIONS", 5))
    await h.engine.wait(lambda: options.final_sent)
    assert "INVITE" in (h.engine.to_pbx[-1].headers.get("Allow") or "")
    message = h.send_pbx(h.pbx_request("MESSAGE", 6))
    await h.engine.wait(lambda: message.final_sent)
    assert h.engine.to_pbx[-1].status == 501
    old = h.send_pbx(h.pbx_request("UPDATE", 1))
    await h.engine.wait(lambda: old.final_sent)
    assert h.engine.to_pbx[-1].status == 500  # RFC 3261 §12.2.2: CSeq went backwards
    assert [x.request.method for x in h.engine.handles] == ["INVITE"]
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


# -- SIP INFO DTMF -------------------------------------------------------------------------------


class DtmfSession(PassthroughSession):
    """Pass-through media that records ``send_dtmf`` (what a relaying backend is asked)."""

    def __init__(self, call_id: str, result: bool | Exception, engine: FakeEngine) -> None:
        super().__init__(call_id)
        self.result = result
        self.engine = engine
        self.digits: list[tuple[Side, str, int, list[int]]] = []

    async def send_dtmf(self, side: Side, digit: str, duration_ms: int) -> bool:
        answered = [r.status for r in self.engine.to_pbx if r.cseq.method == "INFO"]
        self.digits.append((side, digit, duration_ms, answered))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class DtmfBackend(PassthroughBackend):
    def __init__(self, result: bool | Exception, engine: FakeEngine) -> None:
        super().__init__()
        self.result = result
        self.engine = engine
        self.sessions: list[DtmfSession] = []

    async def allocate(self, call_id: str) -> MediaSession:
        session = DtmfSession(call_id, self.result, self.engine)
        self.sessions.append(session)
        return session


def dtmf_info(h: Harness, seq: int, body: bytes, content_type: str) -> Request:
    request = h.pbx_request("INFO", seq, body=body)
    return dataclasses.replace(request, headers=request.headers.set("Content-Type", content_type))


async def dtmf_call(result: bool | Exception) -> tuple[Harness, DtmfBackend]:
    h = Harness()
    backend = DtmfBackend(result, h.engine)
    h.call.media_backend = backend
    await h.connect()
    return h, backend


async def hang_up(h: Harness) -> None:
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


async def test_info_dtmf_from_the_pbx_is_answered_then_played_toward_retell() -> None:
    with structlog.testing.capture_logs() as logs:
        h, backend = await dtmf_call(True)
        relay = dtmf_info(h, 2, b"Signal=5\r\nDuration=160\r\n", "application/dtmf-relay")
        info = h.send_pbx(relay)
        await h.engine.wait(lambda: info.final_sent and backend.sessions[0].digits)
        bare = h.send_pbx(dtmf_info(h, 3, b"#", "application/dtmf"))
        await h.engine.wait(lambda: bare.final_sent and len(backend.sessions[0].digits) == 2)
        # 200 first (the INFO transaction does not wait for the tone), then the digit.
        assert backend.sessions[0].digits == [
            ("b", "5", 160, [200]),
            ("b", "#", 100, [200, 200]),
        ]
        assert [x.request.method for x in h.engine.handles] == ["INVITE"]  # no INFO to Retell
        await hang_up(h)
    relayed = [e for e in logs if e["event"] == "dtmf_info_relayed"]
    assert [(e["digit"], e["duration"]) for e in relayed] == [("5", 160), ("#", 100)]


@pytest.mark.parametrize(
    ("result", "event", "level"),
    [
        (False, "dtmf_info_not_relayed", "info"),  # passthrough, or Retell took no events
        (ServiceUnavailable("rtpengine: no such call"), "dtmf_info_not_relayed", "warning"),
    ],
)
async def test_info_dtmf_that_cannot_be_relayed_is_answered_200_and_logged(
    result: bool | Exception, event: str, level: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        h, backend = await dtmf_call(result)
        info = h.send_pbx(dtmf_info(h, 2, b"Signal=9\r\nDuration=250", "application/dtmf-relay"))
        await h.engine.wait(lambda: info.final_sent and backend.sessions[0].digits)
        assert h.engine.to_pbx[-1].status == 200
        await hang_up(h)
    [entry] = [e for e in logs if e["event"] == event]
    assert (entry["digit"], entry["log_level"]) == ("9", level)


async def test_info_without_a_digit_is_answered_200_and_ignored() -> None:
    with structlog.testing.capture_logs() as logs:
        h, backend = await dtmf_call(True)
        info = h.send_pbx(dtmf_info(h, 2, b"Signal=Z\r\n", "application/dtmf-relay"))
        await h.engine.wait(lambda: info.final_sent)
        assert h.engine.to_pbx[-1].status == 200
        await hang_up(h)
    assert backend.sessions[0].digits == []
    assert [e["event"] for e in logs if e["event"].startswith("dtmf")] == ["dtmf_info_ignored"]


async def test_session_expiry_without_refresh_hangs_up() -> None:
    invite = a_invite(("Session-Expires", "1;refresher=uac"), ("Supported", "timer"))
    h = Harness(invite=invite, min_session_expires=1)
    await h.connect()
    ok = next(r for r in h.engine.to_pbx if r.status == 200)
    assert ok.headers.get("Require") == "timer"
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "session_expired"


async def test_bridge_refreshes_when_it_is_the_refresher() -> None:
    invite = a_invite(("Session-Expires", "1;refresher=uas"), ("Supported", "timer"))
    h = Harness(invite=invite, min_session_expires=1)
    await h.connect()
    await h.engine.wait(lambda: h.engine.requests("UPDATE"))
    (update,) = h.engine.requests("UPDATE")
    assert update.request.headers.get("Session-Expires") == "1;refresher=uac"
    update.deliver(481, to_tag=h.call.caller_leg.local_tag)
    await answer_bye(h.engine, 0)  # the Retell leg only: the PBX dialog is gone
    await h.finished()
    assert h.call.end_reason == "pbx_lost"
    assert [b.request.call_id for b in h.engine.requests("BYE")] == [h.call.agent_leg.call_id]


async def test_max_duration() -> None:
    h = Harness(max_duration=0.05)
    await h.connect()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "max_duration"


async def test_retell_2xx_copy_is_acked_again() -> None:
    h = Harness()
    invite = await h.connect()
    assert invite.final is not None
    h.call.response_again(h.call.agent_leg, invite.final)
    await h.engine.wait(lambda: len(h.engine.acks) == 2)
    assert h.engine.acks[0] == h.engine.acks[1]
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


async def test_requests_before_a_dialog_exists() -> None:
    h = Harness()
    invite = await h.b_invite()
    early = h.send_retell("BYE", 1, invite)
    await h.engine.wait(lambda: early.final_sent)
    assert h.engine.to_pbx[-1].status == 481
    invite.deliver(486)
    await h.finished()


class SilentSession(PassthroughSession):
    """A media session that saw its last packet when it was created."""

    def __init__(self, call_id: str) -> None:
        super().__init__(call_id)
        self.born = asyncio.get_running_loop().time()

    def last_activity(self, side: Side) -> float | None:
        return self.born


class SilentBackend(PassthroughBackend):
    async def allocate(self, call_id: str) -> MediaSession:
        return SilentSession(call_id)


async def test_media_timeout_hangs_up_a_silent_call() -> None:
    h = Harness(media=SilentBackend(), media_timeout=0.1)
    await h.connect()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "media_timeout"


async def test_media_timeout_ignored_when_media_is_not_seen() -> None:
    h = Harness(media_timeout=0.01, max_duration=0.2)  # pass-through: last_activity is None
    await h.connect()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "max_duration"


async def test_long_ringing_repeats_the_provisional_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sbc.b2bua.call.RING_REPEAT", 0.03)
    h = Harness(answer_timeout=0.2)
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(480)
    invite.deliver(487)
    await h.finished()
    ringing = [r for r in h.engine.to_pbx if r.status == 180]
    assert len(ringing) >= 3
    assert len({r.to_tag for r in ringing}) == 1
    assert h.statuses()[-1] == 480


async def test_methods_a_peer_may_not_send_get_405_with_its_allow() -> None:
    h = Harness()
    invite = await h.connect()
    # Retell's stack takes no UPDATE or INFO (docs/peers.md): sbc does not take them from it.
    update = h.send_retell("UPDATE", 2, invite)
    await h.engine.wait(lambda: update.final_sent)
    refused = h.engine.to_pbx[-1]
    assert refused.status == 405
    assert refused.headers.get("Allow") == "INVITE, ACK, CANCEL, BYE, OPTIONS, REFER"
    options = h.send_retell("OPTIONS", 3, invite)
    await h.engine.wait(lambda: options.final_sent)
    assert h.engine.to_pbx[-1].status == 200
    assert h.engine.to_pbx[-1].headers.get("Allow") == "INVITE, ACK, CANCEL, BYE, OPTIONS, REFER"
    assert h.state() is CallState.CONNECTED
    h.send_retell("BYE", 4, invite)
    await answer_bye(h.engine)
    await h.finished()
