"""Calls Retell sends to sbc (``sbc.b2bua.inbound``) against the scripted engine, and how the
manager (``sbc.b2bua.calls``) admits them: source, digest credentials, target rules, capacity.

``engine.to_pbx`` of ``call_harness`` holds what sbc answered to the INVITE it received, here
Retell's; ``engine.handles`` what sbc sent, here to the PBX.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from sbc.b2bua.call import CallState
from sbc.b2bua.calls import CallManager
from sbc.b2bua.events import CallEvent, CallRefused
from sbc.b2bua.inbound import (
    RetellCall,
    retell_dialog_headers,
    retell_provisional_for,
    retell_status_for_failure,
)
from sbc.b2bua.leg import Role
from sbc.b2bua.messages import LocalAddress, Peer, allow_header
from sbc.b2bua.trunk_auth import TrunkAuth
from sbc.media.base import PassthroughBackend
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.sip.digest import ClientAuth, Credentials, parse_authorization, parse_challenge
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import parse_uri
from tests.unit.call_harness import (
    LIMIT,
    PBX_SDP,
    PBX_SOURCE,
    RETELL_SDP,
    FakeEngine,
    FakeHandle,
    a_invite,
    answer_bye,
    config,
)

RETELL_SOURCE = Destination("tcp", "192.0.2.9", 5060)
RETELL_CREDENTIALS = Credentials("retell-trunk", "pa55word")
PBX_CONTACT = "<sip:800@10.0.0.1:5060>"
RETELL_ALLOW = allow_header(Peer.RETELL)  # what Retell may send in its dialogs


def retell_invite(
    user: str = "sales", *extra: tuple[str, str], body: bytes = RETELL_SDP, cseq: int = 1
) -> Request:
    """Retell's INVITE to the termination URI (LiveKit's shape: TCP, E.164 From, X- header)."""
    headers = [
        ("Via", f"SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bKrt{cseq}"),
        ("Record-Route", "<sip:192.0.2.9;transport=tcp;lr>"),
        ("Max-Forwards", "70"),
        ("From", '"Retell Agent" <sip:+14155550100@sip.retellai.com>;tag=rt1'),
        ("To", f"<sip:{user}@10.0.0.5>"),
        ("Call-ID", "retell-call@192.0.2.9"),
        ("CSeq", f"{cseq} INVITE"),
        ("Contact", "<sip:retell@192.0.2.9:5060;transport=tcp>"),
        ("Allow", "INVITE, ACK, CANCEL, BYE, REFER, NOTIFY, OPTIONS"),
        ("X-Retell-Call-Id", "call_abc"),
        *extra,
    ]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    uri = parse_uri(f"sip:{user}@10.0.0.5:5060;transport=tcp")
    return Request("INVITE", uri, Headers(headers), body)


class RetellHarness:
    """One :class:`RetellCall` against the scripted engine; Retell's side is played here."""

    def __init__(self, target: str = "800", **overrides: Any) -> None:
        self.engine = FakeEngine()
        self.invite = overrides.pop("invite", None) or retell_invite()
        self.incoming = IncomingRequest(
            self.engine, "retell-invite", self.invite, RETELL_SOURCE, None
        )
        self.call = RetellCall(
            self.incoming,
            target=target,
            config=config(**overrides),
            engine=self.engine,
            media=PassthroughBackend(),
            call_uuid="uuid-r",
            wall_clock=lambda: 1_795_000_000.0,
            random_bytes=lambda n: b"\x02" * n,
        )
        self.task = asyncio.ensure_future(self.call.run())

    async def finished(self) -> None:
        async with asyncio.timeout(LIMIT):
            await self.task

    def state(self) -> CallState:
        return self.call.state

    async def pbx_invite(self, index: int = 0) -> FakeHandle:
        await self.engine.wait(lambda: len(self.engine.requests("INVITE")) > index)
        return self.engine.requests("INVITE")[index]

    def statuses(self) -> list[int]:
        return [r.status for r in self.engine.to_pbx]

    async def retell_status(self, status: int) -> Response:
        await self.engine.wait(lambda: status in self.statuses())
        return next(r for r in self.engine.to_pbx if r.status == status)

    def retell_request(self, method: str, seq: int) -> Request:
        a = self.call.origin
        headers = [
            ("Via", f"SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bKr{method}{seq}"),
            ("From", '"Retell Agent" <sip:+14155550100@sip.retellai.com>;tag=rt1'),
            ("To", f"<sip:sales@10.0.0.5>;tag={a.local_tag}"),
            ("Call-ID", "retell-call@192.0.2.9"),
            ("CSeq", f"{seq} {method}"),
            ("Contact", "<sip:retell@192.0.2.9:5060;transport=tcp>"),
        ]
        return Request(method, parse_uri("sip:10.0.0.5:5060;transport=tcp"), Headers(headers))

    def send_retell(self, method: str, seq: int) -> IncomingRequest:
        request = self.retell_request(method, seq)
        incoming = IncomingRequest(
            self.engine, f"retell-{method}-{seq}", request, RETELL_SOURCE, request.to_tag
        )
        self.call.request_arrived(self.call.origin, incoming)
        return incoming

    def send_pbx(self, method: str, seq: int, invite: FakeHandle) -> IncomingRequest:
        b = invite.request
        headers = [
            ("Via", f"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKp{method}{seq}"),
            ("From", "<sip:800@10.0.0.1>;tag=pbx800"),
            ("To", b.headers.get("From") or ""),
            ("Call-ID", b.call_id),
            ("CSeq", f"{seq} {method}"),
        ]
        request = Request(method, parse_uri("sip:101@10.0.0.5:5060"), Headers(headers))
        incoming = IncomingRequest(
            self.engine, f"pbx-{method}-{seq}", request, PBX_SOURCE, request.to_tag
        )
        self.call.request_arrived(self.call.bridge.b, incoming)
        return incoming

    async def connect(self) -> FakeHandle:
        invite = await self.pbx_invite()
        invite.deliver(180, to_tag="pbx800", contact=PBX_CONTACT)
        invite.deliver(200, body=PBX_SDP, to_tag="pbx800", contact=PBX_CONTACT)
        await self.retell_status(200)
        ack = self.retell_request("ACK", 1)
        self.call.ack_arrived(self.call.origin, ack)
        await self.connected()
        return invite

    async def connected(self) -> None:
        """Until Retell's ACK has been taken (the call has no event for it: polled)."""
        async with asyncio.timeout(LIMIT):
            while self.call.state is not CallState.CONNECTED:  # noqa: ASYNC110
                await asyncio.sleep(0)


def challenge(handle: FakeHandle) -> None:
    """The PBX challenges sbc's INVITE as 3CX does: 407, MD5, no qop."""
    handle.deliver(
        407,
        to_tag="pbx407",
        contact=PBX_CONTACT,
        headers=(
            ("Proxy-Authenticate", 'Digest nonce="3cxn1",algorithm=MD5,realm="3CXPhoneSystem"'),
        ),
    )


# -- the call -------------------------------------------------------------------------------------


async def test_retell_call_goes_to_the_pbx_from_the_extension_and_is_bridged() -> None:
    h = RetellHarness()
    assert (h.call.origin.role, h.call.bridge.b.role) == (Role.AGENT, Role.HUMAN)
    first = await h.pbx_invite()
    b = first.request
    assert str(b.uri) == "sip:800@10.0.0.1:5060"
    assert b.headers.get("To") == "<sip:800@10.0.0.1>"
    # From the extension (3CX takes calls from an extension only as that extension), with
    # Retell's caller as the name shown and in P-Asserted-Identity.
    from_ = b.headers.get("From") or ""
    assert from_.startswith('"Retell Agent" <sip:101@10.0.0.1>;tag=')
    assert b.headers.get("P-Asserted-Identity") == '"Retell Agent" <sip:+14155550100@10.0.0.1>'
    assert b.headers.get("Contact") == "<sip:101@10.0.0.5:5060>"
    assert "Supported" not in b.headers  # sbc refreshes no session it placed (RFC 4028 §9)
    assert b.call_id != "retell-call@192.0.2.9"
    # Nothing of Retell's INVITE but the caller and the SDP (pass-through media here).
    for name in ("Record-Route", "X-Retell-Call-Id", "Route"):
        assert name not in b.headers
    assert all("192.0.2.9" not in value for _, value in b.headers.items())
    assert "sales" not in str(b.headers.items())
    assert b"c=IN IP4 192.0.2.9" in b.body and b"m=audio 40000 RTP/AVP 8 101" in b.body
    assert h.state() is CallState.CALLING

    # 3CX challenges what an extension sends: answered with the extension's credentials.
    challenge(first)
    second = await h.pbx_invite(1)
    auth = parse_authorization(second.request.headers.get("Proxy-Authorization") or "")
    assert (auth.username, auth.realm, auth.nonce) == ("6001auth", "3CXPhoneSystem", "3cxn1")
    assert second.request.cseq.seq == b.cseq.seq + 1
    assert second.request.call_id == b.call_id
    assert h.statuses() == []  # Retell is told nothing of the challenge

    second.deliver(100)
    second.deliver(180, to_tag="pbx800", contact=PBX_CONTACT)
    ringing = await h.retell_status(180)
    assert ringing.to_tag == h.call.origin.local_tag
    assert ringing.headers.get("Record-Route") == "<sip:192.0.2.9;transport=tcp;lr>"
    assert ringing.headers.get("Contact") == "<sip:10.0.0.5:5060;transport=tcp>"
    assert h.state() is CallState.RINGING

    second.deliver(200, body=PBX_SDP, to_tag="pbx800", contact=PBX_CONTACT)
    ok = await h.retell_status(200)
    assert h.statuses() == [180, 200]
    assert b"c=IN IP4 10.0.0.1" in ok.body and b"m=audio 9000 " in ok.body  # pass-through
    assert ok.headers.get("Content-Type") == "application/sdp"
    assert ok.headers.get("Record-Route") == "<sip:192.0.2.9;transport=tcp;lr>"
    assert ok.headers.get("Contact") == "<sip:10.0.0.5:5060;transport=tcp>"
    assert ok.headers.get("Allow") == RETELL_ALLOW
    assert ok.headers.get("Server") == "sbc"
    for name in ("Session-Expires", "Require", "Supported"):
        assert name not in ok.headers  # Retell runs no session timer (docs/peers.md)
    await h.engine.wait(lambda: h.engine.acks)
    (ack,) = h.engine.acks
    assert str(ack.uri) == "sip:800@10.0.0.1:5060" and ack.cseq.seq == 2

    h.call.ack_arrived(h.call.origin, h.retell_request("ACK", 1))
    await h.connected()
    bye = h.send_retell("BYE", 2)
    pbx_bye = await answer_bye(h.engine)
    await h.finished()
    assert bye.final_sent
    assert pbx_bye.request.call_id == b.call_id
    assert h.call.end_reason == "retell_bye"
    assert (h.call.retell_status, h.call.pbx_status) == (200, 200)
    assert h.call.called == "800"
    assert h.call.caller.number == "+14155550100"


async def test_pbx_hangs_up_and_retell_gets_the_bye() -> None:
    h = RetellHarness()
    invite = await h.connect()
    bye = h.send_pbx("BYE", 1, invite)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    (retell_bye,) = h.engine.requests("BYE")
    assert retell_bye.request.call_id == "retell-call@192.0.2.9"
    assert str(retell_bye.request.uri) == "sip:retell@192.0.2.9:5060;transport=tcp"
    assert retell_bye.request.headers.get("Route") == "<sip:192.0.2.9;transport=tcp;lr>"
    await answer_bye(h.engine)
    await h.finished()
    assert bye.final_sent
    assert h.call.end_reason == "pbx_bye"


async def test_cancel_from_retell_cancels_the_pbx_leg() -> None:
    h = RetellHarness()
    invite = await h.pbx_invite()
    invite.deliver(180, to_tag="pbx800", contact=PBX_CONTACT)
    await h.retell_status(180)
    h.call.cancelled(h.call.origin)
    await h.retell_status(487)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487, to_tag="pbx800")
    await h.finished()
    assert h.statuses() == [180, 487]
    assert h.call.end_reason == "retell_cancel"
    assert h.engine.requests("BYE") == []


@pytest.mark.parametrize(
    ("pbx", "retell"),
    [(486, 486), (603, 603), (404, 404), (480, 480), (500, 503), (503, 503), (302, 480)],
)
async def test_pbx_failure_is_told_to_retell(pbx: int, retell: int) -> None:
    h = RetellHarness()
    invite = await h.pbx_invite()
    invite.deliver(pbx, to_tag="pbx800")
    await h.finished()
    assert h.statuses() == [retell]
    assert (h.call.pbx_status, h.call.retell_status) == (pbx, retell)
    assert h.engine.to_pbx[0].headers.get("Server") == "sbc"


async def test_credentials_the_pbx_refuses_are_480_for_retell() -> None:
    h = RetellHarness()
    challenge(await h.pbx_invite())
    second = await h.pbx_invite(1)
    challenge(second)  # the same realm again, not stale: the credentials were refused
    await h.finished()
    assert len(h.engine.requests("INVITE")) == 2  # never a third try (3CX blacklists)
    assert h.statuses() == [480]


async def test_no_answer_is_480_and_the_pbx_leg_is_cancelled() -> None:
    h = RetellHarness(answer_timeout=0.05)
    invite = await h.pbx_invite()
    invite.deliver(180, to_tag="pbx800", contact=PBX_CONTACT)
    await h.retell_status(480)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487, to_tag="pbx800")
    await h.finished()
    assert h.statuses() == [180, 480]
    assert h.call.end_reason == "answer_timeout"


async def test_a_transfer_asked_inside_a_retell_call_is_refused() -> None:
    h = RetellHarness()
    await h.connect()
    refer = h.retell_request("REFER", 2)
    incoming = IncomingRequest(h.engine, "retell-refer", refer, RETELL_SOURCE, refer.to_tag)
    await h.call._refer(h.call.origin, incoming)
    assert h.engine.to_pbx[-1].status == 403
    assert h.call.transfer is None and h.state() is CallState.CONNECTED
    h.send_retell("BYE", 3)
    await answer_bye(h.engine)
    await h.finished()


# -- the pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pbx", "retell"),
    [
        *((401, 480), (407, 480), (301, 480), (408, 408), (486, 486), (487, 487), (488, 488)),
        *((500, 503), (502, 503), (504, 503), (600, 600), (603, 603), (606, 606)),
    ],
)
def test_retell_status_for_failure(pbx: int, retell: int) -> None:
    assert retell_status_for_failure(pbx) == retell


@pytest.mark.parametrize(
    ("pbx", "retell"), [(100, None), (180, 180), (181, 180), (182, 180), (183, 183), (199, None)]
)
def test_retell_provisional_for(pbx: int, retell: int | None) -> None:
    assert retell_provisional_for(pbx) == retell


def test_retell_dialog_headers_echo_the_route_and_carry_no_timer() -> None:
    invite = retell_invite(
        "sales", ("Record-Route", "<sip:198.51.100.1;lr>"), ("Session-Expires", "1800")
    )
    local = LocalAddress("10.0.0.5", 5061, "tcp")
    headers = retell_dialog_headers(invite, local, user_agent="sbc/1", has_body=True)
    assert headers == (
        ("Record-Route", "<sip:192.0.2.9;transport=tcp;lr>"),
        ("Record-Route", "<sip:198.51.100.1;lr>"),
        ("Contact", "<sip:10.0.0.5:5061;transport=tcp>"),
        ("Allow", RETELL_ALLOW),
        ("Server", "sbc/1"),
        ("Content-Type", "application/sdp"),
    )
    assert retell_dialog_headers(retell_invite(body=b""), local) == (
        ("Record-Route", "<sip:192.0.2.9;transport=tcp;lr>"),
        ("Contact", "<sip:10.0.0.5:5061;transport=tcp>"),
        ("Allow", RETELL_ALLOW),
    )


# -- the manager: which INVITEs from Retell's addresses become calls -------------------------------

PBX_NET = ipaddress.ip_network("10.0.0.0/24")
RETELL_NET = ipaddress.ip_network("192.0.2.0/24")


class Manager:
    """A CallManager on the scripted engine, with Retell's trunk credentials set."""

    def __init__(self, **overrides: Any) -> None:
        self.engine = FakeEngine()
        values: dict[str, Any] = {
            "trusted": (PBX_NET,),
            "retell_trusted": (RETELL_NET,),
            "retell_credentials": RETELL_CREDENTIALS,
        }
        values.update(overrides)
        self.manager = CallManager(
            self.engine,  # type: ignore[arg-type]
            config(**values),
            PassthroughBackend(),
            new_uuid=self._uuid,
        )
        self.events: list[CallEvent] = []
        self.manager.events.subscribe(self.events.append)
        self._uuids = 0

    def _uuid(self) -> str:
        self._uuids += 1
        return f"uuid-{self._uuids}"

    def send(self, request: Request, source: Destination = RETELL_SOURCE) -> IncomingRequest:
        key = f"invite-{request.call_id}-{request.cseq.seq}"
        incoming = IncomingRequest(self.engine, key, request, source, request.to_tag)
        self.manager.handle_request(incoming)
        return incoming

    def last(self) -> Response:
        return self.engine.to_pbx[-1]

    def authorized(self, refused: Response, request: Request, credentials: Credentials) -> Request:
        retry = ClientAuth(credentials).authorize(refused, request, "cnonce1", branch="z9hG4bKa2")
        assert retry is not None
        return retry

    async def refusals(self) -> list[int]:
        await self.manager.events.flush()
        return [e.status for e in self.events if isinstance(e, CallRefused)]

    async def stop(self) -> None:
        await self.manager.stop()


async def test_retell_invite_is_challenged_then_placed_to_the_pbx() -> None:
    m = Manager()
    first = retell_invite()
    m.send(first)
    challenge_response = m.last()
    assert challenge_response.status == 407
    value = challenge_response.headers.get("Proxy-Authenticate") or ""
    parsed = parse_challenge(value, proxy=True)
    assert (parsed.realm, parsed.algorithm, parsed.qop, parsed.stale) == (
        "10.0.0.5",  # sbc's advertised address
        "MD5",
        ("auth",),
        False,
    )
    assert challenge_response.headers.get("Server") == "sbc"
    assert m.manager.active == 0 and m.engine.handles == []  # nothing allocated

    m.send(m.authorized(challenge_response, first, RETELL_CREDENTIALS))
    assert m.last().status == 100
    assert m.manager.active == 1
    (call,) = m.manager.calls.values()
    assert isinstance(call, RetellCall) and call.target == "800"
    await m.engine.wait(lambda: m.engine.requests("INVITE"))
    (invite,) = m.engine.requests("INVITE")
    assert str(invite.request.uri) == "sip:800@10.0.0.1:5060"
    assert await m.refusals() == []  # a challenge is no refusal

    invite.deliver(486, to_tag="pbx800")
    await asyncio.wait_for(m.manager.wait_idle(), LIMIT)
    assert m.last().status == 486
    (record,) = m.manager.records
    assert record.retell_call_id == "retell-call@192.0.2.9"
    assert record.pbx_call_id == invite.request.call_id
    assert (record.called, record.caller) == ("800", "+14155550100")
    assert (record.retell_status, record.pbx_status) == (486, 486)
    await m.stop()


async def test_wrong_password_is_403_and_nothing_is_created() -> None:
    m = Manager()
    first = retell_invite()
    m.send(first)
    m.send(m.authorized(m.last(), first, Credentials("retell-trunk", "guess")))
    assert m.last().status == 403
    wrong_user = retell_invite(cseq=3)
    m.send(wrong_user)
    m.send(m.authorized(m.last(), wrong_user, Credentials("someone", "pa55word")))
    assert m.last().status == 403
    assert m.manager.active == 0 and m.engine.handles == [] and m.manager.records == []
    assert await m.refusals() == [403, 403]
    await m.stop()


async def test_stale_nonce_is_challenged_again_with_stale() -> None:
    m = Manager()
    now = [100.0]
    m.manager.retell_auth = TrunkAuth(RETELL_CREDENTIALS, "10.0.0.5", clock=lambda: now[0])
    first = retell_invite()
    m.send(first)
    retry = m.authorized(m.last(), first, RETELL_CREDENTIALS)
    now[0] += 301
    m.send(retry)
    assert m.last().status == 407
    assert parse_challenge(m.last().headers.get("Proxy-Authenticate") or "").stale
    assert m.manager.active == 0 and m.engine.handles == []
    await m.stop()


async def test_target_not_allowed_is_403_after_the_credentials() -> None:
    m = Manager()
    for user in ("900", "support", "+4420712345678"):
        invite = retell_invite(user)
        m.send(invite)
        assert m.last().status == 407  # credentials first: nothing is said about targets
        m.send(m.authorized(m.last(), invite, RETELL_CREDENTIALS))
        assert m.last().status == 403
    assert m.manager.active == 0 and m.engine.handles == []
    await m.stop()


async def test_a_number_the_rules_allow_and_the_to_user_when_the_uri_has_none() -> None:
    m = Manager(retell_credentials=None)  # no credentials set: no challenge
    m.send(retell_invite("8-0-1"))
    assert m.last().status == 100
    invite = retell_invite()
    headers = invite.headers.set("Call-ID", "retell-2")
    m.send(Request("INVITE", parse_uri("sip:10.0.0.5:5060"), headers, invite.body))
    assert m.last().status == 100
    targets = sorted(c.target for c in m.manager.calls.values() if isinstance(c, RetellCall))
    assert targets == ["800", "801"]
    await m.stop()


async def test_untrusted_source_is_403_without_a_challenge() -> None:
    m = Manager()
    m.send(retell_invite(), Destination("tcp", "198.51.100.7", 5060))
    assert m.last().status == 403
    assert "Proxy-Authenticate" not in m.last().headers
    assert m.manager.active == 0 and m.engine.handles == []
    await m.stop()


async def test_an_address_in_both_lists_is_the_pbx_for_the_extension_else_retell() -> None:
    m = Manager(trusted=(PBX_NET,), retell_trusted=(PBX_NET,))
    m.send(a_invite(), PBX_SOURCE)  # to the extension: the PBX's call, no challenge
    assert m.last().status == 100
    m.send(retell_invite(), PBX_SOURCE)  # to "sales": Retell's, challenged
    assert m.last().status == 407
    (call,) = m.manager.calls.values()
    assert not isinstance(call, RetellCall)
    await m.stop()


async def test_retell_calls_count_against_max_concurrent() -> None:
    m = Manager(retell_credentials=None, max_concurrent=1)
    m.send(retell_invite())
    assert m.last().status == 100
    second = retell_invite()
    second = Request("INVITE", second.uri, second.headers.set("Call-ID", "r2"), second.body)
    m.send(second)
    assert m.last().status == 503
    assert m.last().headers.get("Retry-After") == "30"
    await m.stop()


async def test_a_replayed_invite_is_challenged_again() -> None:
    m = Manager()
    first = retell_invite()
    m.send(first)
    retry = m.authorized(m.last(), first, RETELL_CREDENTIALS)
    m.send(retry)
    assert m.last().status == 100
    replay = Request("INVITE", retry.uri, retry.headers.set("Call-ID", "replayed"), retry.body)
    m.send(replay)
    assert m.last().status == 407
    assert m.manager.active == 1
    await m.stop()


def test_challenge_response_is_well_formed_for_the_client() -> None:
    # sbc's own client policy (which answers 3CX) reads sbc's challenge as a first challenge.
    auth = TrunkAuth(RETELL_CREDENTIALS, "sbc.example")
    request = retell_invite()
    response = build_response(
        request, 407, headers=(("Proxy-Authenticate", auth.challenge()),), to_tag="t"
    )
    retry = ClientAuth(RETELL_CREDENTIALS).authorize(response, request, "c1", branch="z9hG4bKx")
    assert retry is not None
    credentials = parse_authorization(retry.headers.get("Proxy-Authorization") or "")
    assert (credentials.qop, credentials.nc, credentials.algorithm) == ("auth", "00000001", "MD5")
    assert credentials.uri == str(request.uri)
