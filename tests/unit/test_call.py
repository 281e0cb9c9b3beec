"""The call flow (sbc.b2bua.call) against a scripted engine: no sockets, every message checked.

The fake engine records what the call sends (requests, ACKs, CANCELs, responses to the PBX) and
lets each test play Retell's and the PBX's part. Timers are real but tiny (T1 = 5 ms); every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest
import structlog

from sbc.b2bua.call import Call, CallState
from sbc.b2bua.messages import BridgeConfig, RetellTarget
from sbc.b2bua.numbers import NumberPlan
from sbc.b2bua.templates import compile_headers
from sbc.media.base import MediaSession, PassthroughBackend, PassthroughSession, Side
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.sip.digest import Credentials
from sbc.sip.errors import ServiceUnavailable
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import parse_uri

PBX_SDP = (
    b"v=0\r\no=3cxPS 1 1 IN IP4 10.0.0.1\r\ns=3cxPS Audio call\r\nc=IN IP4 10.0.0.1\r\n"
    b"t=0 0\r\nm=audio 9000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
RETELL_SDP = (
    b"v=0\r\no=- 7 7 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
PBX_SOURCE = Destination("udp", "10.0.0.1", 5060)
LIMIT = 2.0


class FakeConfig:
    via_host = "10.0.0.5"

    def via_port(self, transport: str) -> int:
        return 5060


class FakeHandle:
    """A client transaction: the test delivers its responses."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.responses: list[Response] = []
        self.final: Response | None = None
        self.destination = None
        self._changed = asyncio.Event()

    def deliver(self, status: int, *, body: bytes = b"", to_tag: str = "rt1") -> Response:
        headers = [("Contact", "<sip:retell@192.0.2.9:5060;transport=TCP>")]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        response = build_response(
            self.request,
            status,
            to_tag=to_tag if status > 100 else None,
            headers=headers,
            body=body,
        )
        self.responses.append(response)
        if status >= 200:
            self.final = response
        self._changed.set()
        return response

    @property
    def done(self) -> bool:
        return self.final is not None

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Response]:
        index = 0
        while True:
            while index < len(self.responses):
                response = self.responses[index]
                index += 1
                yield response
                if response.status >= 200:
                    return
            self._changed.clear()
            await self._changed.wait()

    def __await__(self) -> Generator[Any, None, Response]:
        return self._final().__await__()

    async def _final(self) -> Response:
        while self.final is None:
            self._changed.clear()
            await self._changed.wait()
        return self.final


class FakeEngine:
    def __init__(self) -> None:
        self.config = FakeConfig()
        self.handles: list[FakeHandle] = []
        self.cancelled: list[FakeHandle] = []
        self.acks: list[Request] = []
        self.to_pbx: list[Response] = []
        self.sent = asyncio.Event()
        self._branch = 0

    def make_via(self, transport: str) -> str:
        self._branch += 1
        return f"SIP/2.0/{transport.upper()} 10.0.0.5:5060;branch=z9hG4bKf{self._branch};rport"

    def send_request(self, request: Request, target: object = None) -> FakeHandle:
        if "Via" not in request.headers:
            request = dataclasses.replace(
                request, headers=request.headers.prepend("Via", self.make_via("tcp"))
            )
        handle = FakeHandle(request)
        self.handles.append(handle)
        self.sent.set()
        return handle

    def cancel(self, handle: FakeHandle) -> FakeHandle:
        self.cancelled.append(handle)
        self.sent.set()
        return FakeHandle(handle.request)

    async def send_ack(self, ack: Request, target: object = None) -> Request:
        self.acks.append(ack)
        self.sent.set()
        return ack

    def respond(self, key: str, response: Response) -> None:
        self.to_pbx.append(response)
        self.sent.set()

    async def wait(self, predicate: Any) -> None:
        async with asyncio.timeout(LIMIT):
            while not predicate():
                self.sent.clear()
                await self.sent.wait()

    def requests(self, method: str) -> list[FakeHandle]:
        return [h for h in self.handles if h.request.method == method]


def a_invite(*extra: tuple[str, str], body: bytes = PBX_SDP) -> Request:
    headers = Headers(
        [
            ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKpbx1;rport=5060"),
            ("Record-Route", "<sip:10.0.0.1;lr>"),
            ("From", '"Alice" <sip:02071234567@10.0.0.1>;tag=pbxtag'),
            ("To", "<sip:101@10.0.0.5>"),
            ("Call-ID", "pbx-call@10.0.0.1"),
            ("CSeq", "1 INVITE"),
            ("Contact", "<sip:3cx@10.0.0.1:5060>"),
            ("Allow", "INVITE, ACK, BYE, CANCEL, UPDATE, INFO"),
            ("X-Customer-Id", "C-9"),
            *extra,
            ("Content-Type", "application/sdp"),
        ]
    )
    return Request("INVITE", parse_uri("sip:101@10.0.0.5:5060"), headers, body)


def config(**overrides: Any) -> BridgeConfig:
    values: dict[str, Any] = {
        "extension": "101",
        "retell": RetellTarget("retell.test", 5060, "tcp", "+14155550100"),
        "answer_timeout": 1.0,
        "max_duration": 5.0,
        "number_plan": NumberPlan(country_code="44"),
        "headers": compile_headers({"X-Caller-Number": "{caller_number}"}, ["X-Customer-*"]),
        "pbx_credentials": Credentials("6001auth", "secret"),
        "t1": 0.005,
        "t2": 0.04,
    }
    values.update(overrides)
    return BridgeConfig(**values)


class Harness:
    def __init__(self, **overrides: Any) -> None:
        self.engine = FakeEngine()
        media = overrides.pop("media", None) or PassthroughBackend()
        self.incoming = IncomingRequest(
            self.engine,
            "pbx-invite",
            overrides.pop("invite", None) or a_invite(),
            PBX_SOURCE,
            None,
        )
        self.call = Call(
            self.incoming,
            config=config(**overrides),
            engine=self.engine,  # type: ignore[arg-type]
            media=media,
            call_uuid="uuid-1",
            wall_clock=lambda: 1_795_000_000.0,
            random_bytes=lambda n: b"\x01" * n,
        )
        self.task = asyncio.ensure_future(self.call.run())

    def state(self) -> CallState:
        return self.call.state

    async def finished(self) -> None:
        async with asyncio.timeout(LIMIT):
            await self.task

    async def b_invite(self) -> FakeHandle:
        await self.engine.wait(lambda: self.engine.requests("INVITE"))
        return self.engine.requests("INVITE")[0]

    def statuses(self) -> list[int]:
        return [r.status for r in self.engine.to_pbx]

    async def pbx_status(self, status: int) -> Response:
        await self.engine.wait(lambda: status in self.statuses())
        return next(r for r in self.engine.to_pbx if r.status == status)

    async def connect(self) -> FakeHandle:
        invite = await self.b_invite()
        invite.deliver(180)
        invite.deliver(200, body=RETELL_SDP)
        await self.pbx_status(200)
        self.pbx_ack(1)
        await asyncio.wait_for(self.call.up.wait(), LIMIT)
        return invite

    def pbx_ack(self, seq: int) -> None:
        ack = self.pbx_request("ACK", seq)
        self.call.ack_arrived(self.call.caller_leg, ack)

    def pbx_request(
        self, method: str, seq: int, *extra: tuple[str, str], body: bytes = b""
    ) -> Request:
        headers = [
            ("Via", f"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKp{method}{seq}"),
            ("From", '"Alice" <sip:02071234567@10.0.0.1>;tag=pbxtag'),
            ("To", f"<sip:101@10.0.0.5>;tag={self.call.caller_leg.local_tag}"),
            ("Call-ID", "pbx-call@10.0.0.1"),
            ("CSeq", f"{seq} {method}"),
            ("Contact", "<sip:3cx@10.0.0.1:5060>"),
            *extra,
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return Request(method, parse_uri("sip:101@10.0.0.5:5060"), Headers(headers), body)

    def send_pbx(self, request: Request) -> IncomingRequest:
        incoming = IncomingRequest(
            self.engine,
            f"pbx-{request.method}-{request.cseq.seq}",
            request,
            PBX_SOURCE,
            request.to_tag,
        )
        self.call.request_arrived(self.call.caller_leg, incoming)
        return incoming

    def send_retell(self, method: str, seq: int, invite: FakeHandle) -> IncomingRequest:
        b = invite.request
        request = Request(
            method,
            parse_uri("sip:10.0.0.5:5060;transport=tcp"),
            Headers(
                [
                    ("Via", f"SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bKr{seq}"),
                    ("From", "<sip:+14155550100@retell.test>;tag=rt1"),
                    ("To", f"{b.headers.get('From')}"),
                    ("Call-ID", b.call_id),
                    ("CSeq", f"{seq} {method}"),
                ]
            ),
        )
        incoming = IncomingRequest(
            self.engine,
            f"retell-{method}-{seq}",
            request,
            Destination("tcp", "192.0.2.9", 5060),
            request.to_tag,
        )
        self.call.request_arrived(self.call.agent_leg, incoming)
        return incoming


async def answer_bye(engine: FakeEngine, index: int = 0, status: int = 200) -> FakeHandle:
    await engine.wait(lambda: len(engine.requests("BYE")) > index)
    bye = engine.requests("BYE")[index]
    bye.deliver(status, to_tag=bye.request.to_tag or "x")
    return bye


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


async def test_no_sdp_or_no_common_codec_is_488_and_nothing_is_sent() -> None:
    h = Harness(invite=a_invite(body=b""))
    await h.finished()
    assert h.statuses() == [488]
    g729 = PBX_SDP.replace(b"RTP/AVP 8 0 101", b"RTP/AVP 18").replace(b"PCMA", b"G729")
    h2 = Harness(invite=a_invite(body=g729))
    await h2.finished()
    assert h2.statuses() == [488]
    assert h.engine.handles == [] and h2.engine.handles == []


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
