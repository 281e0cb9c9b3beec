"""The call layer's fast paths (issue #12, per-call CPU): each must give exactly what the
general code gives, and these tests compare the two.

* leg b's INVITE without a task (``Leg.start_invite`` fed by ``OutgoingRequest.subscribe``)
  against ``Leg.send_invite`` iterating the handle;
* ``escape_user`` without ``quote`` for users with nothing to escape;
* the header templates' control-character check without a lookup per character;
* ``MediaSession.filter`` returning an SDP whose stream shape filtering leaves unchanged;
* the fixed parts of leg b's INVITE built once per route.
"""

from __future__ import annotations

import asyncio
import sys
import unicodedata
from collections.abc import Callable
from enum import Enum
from urllib.parse import quote

import pytest
import structlog

from sbc.b2bua.absorber import Absorber
from sbc.b2bua.calls import hung_up_by
from sbc.b2bua.callstate import CallInput, CallState
from sbc.b2bua.leg import Leg, Role
from sbc.b2bua.messages import (
    Caller,
    LegIds,
    LocalAddress,
    Peer,
    RetellTarget,
    _b_invite_fixed,
    build_b_invite,
    call_facts,
    escape_user,
)
from sbc.b2bua.templates import (
    Literal,
    Variable,
    _control_reason,
    compile_template,
    render_template,
)
from sbc.media.base import PassthroughSession
from sbc.net.handles import IncomingRequest, OutgoingRequest
from sbc.sdp.model import NoCommonCodec
from sbc.sdp.offer_answer import filter_codecs
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.digest import ClientAuth, Credentials
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import NameAddr
from tests.unit.call_harness import (
    PBX_SDP,
    PBX_SOURCE,
    FakeEngine,
    FakeHandle,
    a_invite,
    config,
)

# -- leg b's INVITE: callbacks against the task -------------------------------------------------


def _leg(engine: FakeEngine, *, auth: bool = True) -> Leg:
    drawn = iter(range(1, 1000))
    return Leg(
        Role.AGENT,
        local=LocalAddress("10.0.0.5", 5060, "tcp"),
        call_id="b-call",
        local_tag="btag",
        engine=engine,  # type: ignore[arg-type]
        random_bytes=lambda n: next(drawn).to_bytes(n, "big"),
        user_agent="sbc",
        log=structlog.get_logger("test"),
        auth=ClientAuth(Credentials("user", "pw")) if auth else None,
    )


def challenge(nonce: str = "n1", stale: bool = False) -> tuple[str, str]:
    extra = ", stale=true" if stale else ""
    return ("Proxy-Authenticate", f'Digest realm="retell", nonce="{nonce}"{extra}')


CHALLENGE = challenge()
Script = list[list[tuple[int, tuple[tuple[str, str], ...]]]]  # per INVITE sent: its responses


async def _run(
    start: Callable[[Leg, Callable[[Response], None]], asyncio.Task[None] | None],
    script: Script,
    *,
    auth: bool = True,
) -> tuple[list[tuple[int, str]], list[str], Leg]:
    """Feed ``script`` (per INVITE sent: its responses) to a leg whose INVITE ``start``
    sends; returns what reached ``deliver`` (status, CSeq), the INVITEs' Authorization-less
    CSeqs and Proxy-Authorization presence, and the leg."""
    engine = FakeEngine()
    leg = _leg(engine, auth=auth)
    got: list[tuple[int, str]] = []
    task = start(leg, lambda r: got.append((r.status, str(r.cseq.seq))))
    for index, responses in enumerate(script):
        await engine.wait(lambda index=index: len(engine.requests("INVITE")) > index)
        handle = engine.requests("INVITE")[index]
        for status, headers in responses:
            handle.deliver(status, headers=headers)
            await asyncio.sleep(0)  # let a task-driven leg take it (the general path)
    if task is not None:
        await asyncio.wait_for(task, 2)
    sent = [
        f"{h.request.cseq.seq}:{'Proxy-Authorization' in h.request.headers}"
        for h in engine.requests("INVITE")
    ]
    return got, sent, leg


def _invite() -> Request:
    return build_b_invite(
        config(), LocalAddress("10.0.0.5", 5060, "tcp"), LegIds("b-call", "btag"), Caller("", None)
    )


SCRIPTS: dict[str, Script] = {
    "answered": [[(100, ()), (180, ()), (183, ()), (200, ())]],
    "refused": [[(180, ()), (486, ())]],
    "challenged": [[(407, (CHALLENGE,))], [(180, ()), (200, ())]],
    "challenged_again": [[(407, (CHALLENGE,))], [(407, (CHALLENGE,))]],  # refused: same nonce
    "challenged_thrice": [[(407, (challenge(f"n{i}", i > 0),))] for i in range(3)],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_start_invite_delivers_what_send_invite_delivers(name: str) -> None:
    script = SCRIPTS[name]
    invite = _invite()

    def general(leg: Leg, deliver: Callable[[Response], None]) -> asyncio.Task[None]:
        return asyncio.ensure_future(leg.send_invite(invite, deliver))

    def fast(leg: Leg, deliver: Callable[[Response], None]) -> None:
        leg.start_invite(invite, deliver)

    want = await _run(general, script)
    got = await _run(fast, script)
    assert got[0] == want[0] and got[0]  # the same responses, in the same order
    assert got[1] == want[1]  # the same INVITEs (CSeq + 1 with credentials per challenge)
    assert got[2].outgoing is not None and want[2].outgoing is not None
    assert got[2].outgoing.request == want[2].outgoing.request  # what a CANCEL would name


async def test_start_invite_without_credentials_hands_the_challenge_over() -> None:
    invite = _invite()
    got, sent, _ = await _run(
        lambda leg, deliver: leg.start_invite(invite, deliver),
        [[(407, (CHALLENGE,))]],
        auth=False,
    )
    assert got == [(407, "1")] and sent == ["1:False"]


async def test_a_call_being_set_up_runs_no_task_but_its_flow() -> None:
    from tests.unit.call_harness import Harness

    h = Harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    assert len(asyncio.all_tasks()) == 2  # this test and the call's flow
    h.call.shutdown()
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)
    await h.finished()
    assert h.statuses()[-1] == 503


async def test_subscribe_hands_over_past_responses_and_lets_go_after_the_final() -> None:
    request = a_invite()
    handle = OutgoingRequest(request, None, True)
    handle.deliver(build_response(request, 100))
    seen: list[int] = []
    handle.subscribe(lambda r: seen.append(r.status))
    assert seen == [100]
    handle.deliver(build_response(request, 180, to_tag="t"))
    handle.deliver(build_response(request, 200, to_tag="t"))
    handle.deliver(build_response(request, 200, to_tag="t"))  # after the final: ignored
    assert seen == [100, 180, 200]
    assert handle._subscriber is None  # no cycle through the callback once final
    # Subscribed after the final: handed over at once, and not kept.
    late: list[int] = []
    handle.subscribe(lambda r: late.append(r.status))
    assert late == [100, 180, 200] and handle._subscriber is None
    fake = FakeHandle(request)
    fake.deliver(180)
    fake.subscribe(lambda r: late.append(r.status))
    assert late[-1] == 180


# -- escape_user, templates --------------------------------------------------------------------


def test_escape_user_is_quote_for_every_character() -> None:
    safe = "-_.!~*'()&=+$,;?/"
    for code in range(0x800):
        ch = chr(code)
        for user in (ch, f"+44{ch}20", f"{ch}{ch}"):
            assert escape_user(user) == quote(user, safe=safe), repr(user)
    assert escape_user("") == ""


def _control_reason_general(text: str) -> str | None:
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc" or ch in "\u2028\u2029":
            return f"control character U+{ord(ch):04X}"
        if category == "Cs":
            return "invalid UTF-8"
    return None


def test_control_reason_matches_the_character_by_character_check() -> None:
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        assert _control_reason(ch) == _control_reason_general(ch), hex(code)
    for text in ("+442071234567", "Alice Smith", "a\u00a0b", "x\u200by", "caf\u00e9\r", ""):
        assert _control_reason(text) == _control_reason_general(text)


# -- the codec filter --------------------------------------------------------------------------

FILTERED = (
    b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 18 0 101\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n"
    b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
    b"m=video 40002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
)
ONLY_EVENTS = (
    b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 101\r\na=rtpmap:101 telephone-event/8000\r\n"
)


@pytest.mark.parametrize("body", [PBX_SDP, FILTERED, ONLY_EVENTS], ids=["kept", "cut", "none"])
async def test_filter_gives_what_filter_codecs_gives(body: bytes) -> None:
    for codecs in (("PCMU", "PCMA", "G722", "telephone-event"), ("PCMA",), ("PCMU",)):
        session = PassthroughSession("c", codecs=codecs)
        # Twice, and a third time at another port: the shape is remembered after the first.
        for port in (40000, 40000, 41234):
            sdp = parse_sdp(body.replace(b"40000", str(port).encode()))
            try:
                want = serialize_sdp(filter_codecs(sdp, codecs))
            except NoCommonCodec:
                with pytest.raises(NoCommonCodec):
                    session.filter(sdp)
                continue
            assert serialize_sdp(session.filter(sdp)) == want


async def test_passthrough_offer_bytes_are_unchanged_by_the_shortcut() -> None:
    session = PassthroughSession("c")
    first = serialize_sdp(await session.offer("a", parse_sdp(PBX_SDP)))
    again = PassthroughSession("d")
    second = serialize_sdp(await again.offer("a", parse_sdp(PBX_SDP)))
    # Only the o= line (a session id per call) differs.
    strip = [line for line in first.split(b"\r\n") if not line.startswith(b"o=")]
    assert strip == [line for line in second.split(b"\r\n") if not line.startswith(b"o=")]


# -- leg b's INVITE ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_fixed_parts_of_the_b_invite_are_built_as_before(transport: str) -> None:
    target = RetellTarget("retell.test", None if transport == "udp" else 5061, transport, "+1415")
    local = LocalAddress("10.0.0.5", 5060, transport)
    request_uri, scheme, to, contact = _b_invite_fixed(target, local)
    assert request_uri == target.request_uri
    assert scheme == ("sips" if transport == "tls" else "sip")
    assert to == str(NameAddr(target.to_uri))
    assert contact == local.contact
    assert Role.AGENT.peer is Peer.RETELL
    assert Role.CALLER.peer is Role.HUMAN.peer is Peer.PBX


# -- the 200 to leg a, repeated until its ACK -------------------------------------------------


def _absorber_and_leg(engine: FakeEngine) -> tuple[Absorber, Leg, IncomingRequest, Response]:
    absorber = Absorber(
        config=config(t1=0.01, t2=0.04),
        bridge=lambda: None,
        spawn=asyncio.ensure_future,
        log=structlog.get_logger("test"),
    )
    leg = _leg(engine)
    incoming = IncomingRequest(engine, "k", a_invite(), PBX_SOURCE, None)
    return absorber, leg, incoming, incoming.response(200)


async def _settle_2xx(fast: bool, acked: bool) -> Request | None:
    engine = FakeEngine()
    absorber, leg, incoming, ok = _absorber_and_leg(engine)
    result: asyncio.Future[Request | None] = asyncio.get_running_loop().create_future()
    if fast:
        absorber.send_2xx_then(leg, incoming, ok, result.set_result)
    else:
        task = asyncio.ensure_future(absorber.send_2xx(leg, incoming, ok))
        task.add_done_callback(lambda t: result.set_result(t.result()))
    await engine.wait(lambda: len(engine.to_pbx) >= 3)  # the 200 and two copies
    ack = Request("ACK", a_invite().uri, a_invite().headers.set("CSeq", "1 ACK"))
    if acked:
        absorber.ack_arrived(leg, ack)
    got = await asyncio.wait_for(result, 2)
    assert got == (ack if acked else None)
    copies = len(engine.to_pbx)
    await asyncio.sleep(0.05)  # over a resend interval (t2): no copy after it settled
    assert len(engine.to_pbx) == copies
    assert not absorber._acks
    # An empty table, not one that held the wait (kept for the whole held call).
    assert sys.getsizeof(absorber._acks) == sys.getsizeof({})
    return got


@pytest.mark.parametrize("acked", [True, False], ids=["acked", "no_ack"])
async def test_send_2xx_then_repeats_and_settles_as_send_2xx(acked: bool) -> None:
    assert await _settle_2xx(True, acked) == await _settle_2xx(False, acked)


async def test_cancel_waits_stops_the_copies_without_settling() -> None:
    engine = FakeEngine()
    absorber, leg, incoming, ok = _absorber_and_leg(engine)
    settled: list[Request | None] = []
    absorber.send_2xx_then(leg, incoming, ok, settled.append)
    await engine.wait(lambda: len(engine.to_pbx) >= 2)
    absorber.cancel_waits()
    await asyncio.sleep(0)  # the wait's callback
    copies = len(engine.to_pbx)
    await asyncio.sleep(0.05)
    assert len(engine.to_pbx) == copies and settled == [] and not absorber._acks


# -- the Via of in-dialog requests, templates --------------------------------------------------


@pytest.mark.parametrize(
    "source", ["{caller_number}", "{now}", "id-{call_uuid}", "{called}{caller_name}", "x"]
)
def test_one_variable_templates_render_as_the_general_loop(source: str) -> None:
    template = compile_template("X-Test", source)
    facts = call_facts(
        a_invite(), Caller("+442071234567", "Alice"), "101", "uuid-1", 1_795_000_000.0
    )
    general = "".join(
        part.text
        if isinstance(part, Literal)
        else facts.value(part.name)
        if isinstance(part, Variable)
        else ", ".join(facts.headers.get_all(part.name))
        for part in template.parts
    )
    assert render_template(template, facts) == general


def _hung_up_by_general(end_reason: str) -> str:
    for peer in Peer:
        name = peer.value
        if end_reason in (f"{name}_bye", f"{name}_cancel") or end_reason.startswith(f"{name}:"):
            return name
    return "sbc"


@pytest.mark.parametrize(
    "reason",
    [
        "pbx_bye", "retell_bye", "pbx_cancel", "retell_cancel", "retell:486", "pbx:503",
        "retell:", "pbx", "retell_byee", "media_timeout", "refused:488", "transferred", "",
        "sbc:1", "retell_lost", "error", "shutdown", ":486", "x:retell:1",
    ],
)  # fmt: skip
def test_hung_up_by_matches_the_loop_over_peers(reason: str) -> None:
    assert hung_up_by(reason) == _hung_up_by_general(reason)


@pytest.mark.parametrize("user", [None, "101", "+44 20", "a;b"])
@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_contact_is_built_once_as_before(user: str | None, transport: str) -> None:
    local = LocalAddress("10.0.0.5", 5062, transport, user)
    assert local.contact == f"<{local.contact_uri}>"
    assert local.contact is LocalAddress("10.0.0.5", 5062, transport, user).contact  # once


@pytest.mark.parametrize("kind", [Role, Peer, CallState, CallInput])
def test_call_enums_hash_by_identity_and_work_as_keys(kind: type[Enum]) -> None:
    members = list(kind)
    table = {member: index for index, member in enumerate(members)}
    for index, member in enumerate(members):
        assert hash(member) == object.__hash__(member)
        assert table[kind(member.value)] == index  # looked up by value: the same member
        assert (member, member) in {(m, m) for m in members}
    assert len(set(members)) == len(members)
