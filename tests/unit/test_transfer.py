"""Transfers (sbc.b2bua.transfer) through a whole call against the scripted engine, on a fake
clock (looptime): REFER from the agent, 202 and NOTIFYs back to it, REFER or INVITE toward the
PBX, and what happens to every leg."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import pytest

from sbc.b2bua.call import CallState
from sbc.b2bua.leg import Role
from sbc.b2bua.transfer_rules import TransferConfig, sipfrag_status
from sbc.sip.message import Request
from tests.unit.call_harness import FakeHandle, Harness, answer_bye, config

pytestmark = pytest.mark.looptime

HUMAN_SDP = (
    b"v=0\r\no=queue 5 5 IN IP4 10.0.0.77\r\ns=-\r\nc=IN IP4 10.0.0.77\r\nt=0 0\r\n"
    b"m=audio 7000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)
CHALLENGE = (("Proxy-Authenticate", 'Digest realm="3CXPhoneSystem", nonce="n1", algorithm=MD5'),)


def harness(mode: Literal["refer", "invite"] = "refer", **overrides: object) -> Harness:
    transfer = replace(config().transfer, mode=mode, ring_timeout=30.0)
    values: dict[str, object] = {
        "transfer": transfer,
        "t1": 0.5,
        "t2": 4.0,
        "max_duration": 7200.0,
        "limit": 3600.0,
    }
    values.update(overrides)
    return Harness(**values)


async def notifies(h: Harness, count: int) -> list[FakeHandle]:
    """The first ``count`` NOTIFYs sbc sent to the agent, each answered 200 as Retell does."""
    await h.engine.wait(lambda: len(h.engine.requests("NOTIFY")) >= count)
    sent = h.engine.requests("NOTIFY")[:count]
    for notify in sent:
        if notify.final is None:
            notify.deliver(200, to_tag="rt1")
    return sent


def sipfrag_of(notify: FakeHandle) -> tuple[int | None, str]:
    request = notify.request
    return sipfrag_status(request.body), request.headers.get("Subscription-State") or ""


def refer(h: Harness, invite: FakeHandle, refer_to: str, *extra: tuple[str, str]) -> Request:
    incoming = h.send_retell("REFER", 2, invite, ("Refer-To", refer_to), *extra)
    return incoming.request


async def until(predicate: Callable[[], bool]) -> None:
    """Let the call's tasks run until ``predicate`` holds (no clock involved)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never reached")


async def connected(h: Harness) -> FakeHandle:
    invite = await h.connect()
    await until(lambda: h.state() is CallState.CONNECTED)
    return invite


# -- refer mode ------------------------------------------------------------------------------------


async def test_refer_mode_hands_the_caller_to_the_pbx() -> None:
    h = harness("refer")
    invite = await connected(h)
    refer(h, invite, "sip:sales@sip.retellai.com", ("X-Transfer-Reason", "test"))
    await h.engine.wait(lambda: 202 in h.statuses())
    (trying,) = await notifies(h, 1)
    assert sipfrag_of(trying) == (100, "active;expires=60")
    assert trying.request.headers.get("Event") == "refer"
    assert trying.request.call_id == invite.request.call_id
    # The REFER to 3CX, challenged once and answered with the extension's credentials.
    await h.engine.wait(lambda: h.engine.requests("REFER"))
    first = h.engine.requests("REFER")[0]
    assert first.request.call_id == "pbx-call@10.0.0.1"
    assert first.request.headers.get("Refer-To") == "<sip:800@10.0.0.1:5060>"
    assert first.request.headers.get("Referred-By") == "<sip:101@10.0.0.1>"
    first.deliver(407, to_tag="pbxtag", headers=CHALLENGE)
    await h.engine.wait(lambda: len(h.engine.requests("REFER")) == 2)
    second = h.engine.requests("REFER")[1]
    assert 'username="6001auth"' in (second.request.headers.get("Proxy-Authorization") or "")
    assert second.request.cseq.seq == first.request.cseq.seq + 1
    second.deliver(202, to_tag="pbxtag")
    assert h.state() is CallState.TRANSFERRING
    # 3CX's progress: a 1xx (not relayed: Retell wants one 100 and the outcome), then 200.
    progress = h.send_pbx(
        h.pbx_request(
            "NOTIFY",
            5,
            ("Event", "refer"),
            ("Subscription-State", "active"),
            ("Content-Type", "message/sipfrag"),
            body=b"SIP/2.0 180 Ringing\r\n",
        )
    )
    await h.engine.wait(lambda: progress.final_sent)
    done = h.send_pbx(
        h.pbx_request(
            "NOTIFY",
            6,
            ("Event", "refer"),
            ("Subscription-State", "terminated;reason=noresource"),
            ("Content-Type", "message/sipfrag;version=2.0"),
            body=b"SIP/2.0 200 OK\r\n",
        )
    )
    await h.engine.wait(lambda: done.final_sent)
    _, final = await notifies(h, 2)
    assert sipfrag_of(final) == (200, "terminated;reason=noresource")
    # sbc leaves the PBX dialog (RFC 5589), Retell hangs up its own leg about a second later.
    pbx_bye = await answer_bye(h.engine, 0)
    assert pbx_bye.request.call_id == "pbx-call@10.0.0.1"
    await asyncio.sleep(1.0)
    bye = h.send_retell("BYE", 3, invite)
    await h.finished()
    assert bye.final_sent and h.engine.to_pbx[-1].status == 200
    assert len(h.engine.requests("BYE")) == 1  # Retell's leg ended by Retell's own BYE
    assert h.call.end_reason == "transferred"
    (record,) = h.call.transfers
    assert (record.target, record.mode, record.outcome, record.status) == (
        "800",
        "refer",
        "transferred",
        200,
    )


async def test_refer_mode_failure_keeps_the_caller_with_the_agent() -> None:
    h = harness("refer")
    invite = await connected(h)
    refer(h, invite, "tel:800")
    await notifies(h, 1)
    await h.engine.wait(lambda: h.engine.requests("REFER"))
    h.engine.requests("REFER")[0].deliver(202, to_tag="pbxtag")
    busy = h.send_pbx(
        h.pbx_request(
            "NOTIFY",
            5,
            ("Event", "refer"),
            ("Subscription-State", "terminated"),
            ("Content-Type", "message/sipfrag"),
            body=b"SIP/2.0 486 Busy Here\r\n",
        )
    )
    await h.engine.wait(lambda: busy.final_sent)
    _, final = await notifies(h, 2)
    assert sipfrag_of(final) == (486, "terminated;reason=noresource")
    await until(lambda: h.state() is CallState.CONNECTED)
    assert h.engine.requests("BYE") == []
    h.send_pbx(h.pbx_request("BYE", 7))
    await answer_bye(h.engine)
    await h.finished()
    assert h.call.end_reason == "pbx_bye"
    assert h.call.transfers[0].outcome == "failed"


async def test_notify_that_never_comes_fails_the_transfer_after_the_transfer_timer() -> None:
    h = harness("refer")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    await h.engine.wait(lambda: h.engine.requests("REFER"))
    h.engine.requests("REFER")[0].deliver(202, to_tag="pbxtag")
    started = asyncio.get_running_loop().time()
    _, final = await notifies(h, 2)
    assert sipfrag_of(final)[0] == 408
    assert asyncio.get_running_loop().time() - started == pytest.approx(30.0 + 32.0)
    await until(lambda: h.state() is CallState.CONNECTED)


# -- target rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["sip:+19005551234@sip.retellai.com", "tel:+441234", "999"])
async def test_a_target_outside_allow_is_refused_and_nothing_reaches_the_pbx(target: str) -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, target)
    await h.engine.wait(lambda: 202 in h.statuses())
    (final,) = await notifies(h, 1)
    assert sipfrag_of(final) == (403, "terminated;reason=noresource")
    await until(lambda: h.state() is CallState.CONNECTED)
    assert h.engine.requests("REFER") == [] and len(h.engine.requests("INVITE")) == 1
    assert h.call.transfers[0].outcome == "refused"


async def test_refer_without_refer_to_is_400() -> None:
    h = harness()
    invite = await connected(h)
    h.send_retell("REFER", 2, invite)
    await h.engine.wait(lambda: 400 in h.statuses())
    await until(lambda: h.state() is CallState.CONNECTED)
    assert h.engine.requests("NOTIFY") == []


# -- invite mode -----------------------------------------------------------------------------------


async def human_invite(h: Harness, index: int = 1) -> FakeHandle:
    await h.engine.wait(lambda: len(h.engine.requests("INVITE")) > index)
    return h.engine.requests("INVITE")[index]


async def test_invite_mode_bridges_the_caller_to_the_human() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "sip:sales@sip.retellai.com", ("X-Transfer-Reason", "test"))
    await notifies(h, 1)
    first = await human_invite(h)
    request = first.request
    assert str(request.uri) == "sip:800@10.0.0.1:5060"
    assert (request.headers.get("From") or "").startswith('"Alice" <sip:101@10.0.0.1>;tag=')
    assert request.headers.get("P-Asserted-Identity") == '"Alice" <sip:+442071234567@10.0.0.1>'
    assert request.headers.get("X-Caller-Number") == "+442071234567"  # the call's X- headers
    assert request.headers.get("X-Transfer-Reason") == "test"  # and the REFER's
    assert request.call_id not in ("pbx-call@10.0.0.1", invite.request.call_id)
    first.deliver(407, to_tag="q1", headers=CHALLENGE)
    second = await human_invite(h, 2)
    assert 'username="6001auth"' in (second.request.headers.get("Proxy-Authorization") or "")
    second.deliver(180, to_tag="q1")
    second.deliver(200, to_tag="q1", body=HUMAN_SDP, contact="<sip:800@10.0.0.1:5060>")
    # Pass-through media: the caller's leg is re-INVITEd toward the human's address.
    await h.engine.wait(lambda: len(h.engine.requests("INVITE")) == 4)
    reinvite = h.engine.requests("INVITE")[3]
    assert reinvite.request.call_id == "pbx-call@10.0.0.1"
    assert b"c=IN IP4 10.0.0.77" in reinvite.request.body
    reinvite.deliver(200, to_tag="pbxtag", body=b"", contact="<sip:3cx@10.0.0.1:5060>")
    _, final = await notifies(h, 2)
    assert sipfrag_of(final) == (200, "terminated;reason=noresource")
    await until(lambda: h.call.bridge.b.role is Role.HUMAN)
    human = h.call.legs[Role.HUMAN]
    assert [a.call_id for a in h.engine.acks].count(human.call_id) == 1
    # Retell did not hang up within the grace period: sbc ends its leg.
    retell_bye = await answer_bye(h.engine, 0)
    assert retell_bye.request.call_id == invite.request.call_id
    assert h.state() is CallState.CONNECTED
    # The caller hangs up: the human's leg gets the BYE.
    h.send_pbx(h.pbx_request("BYE", 9))
    human_bye = await answer_bye(h.engine, 1)
    assert human_bye.request.call_id == human.call_id
    await h.finished()
    assert h.call.end_reason == "pbx_bye"
    record = h.call.transfers[0]
    assert (record.mode, record.outcome, record.status) == ("invite", "transferred", 200)


@pytest.mark.parametrize("status", [486, 603, 404])
async def test_invite_mode_target_refusing_keeps_the_agent(status: int) -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    (await human_invite(h)).deliver(status, to_tag="q1")
    _, final = await notifies(h, 2)
    assert sipfrag_of(final) == (status, "terminated;reason=noresource")
    await until(lambda: h.state() is CallState.CONNECTED)
    assert h.call.bridge.b is h.call.agent_leg
    h.send_retell("BYE", 3, invite)
    await answer_bye(h.engine)  # the caller's leg, as before any transfer
    await h.finished()
    assert h.call.end_reason == "retell_bye"


async def test_invite_mode_no_answer_is_cancelled_after_ring_timeout() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    ringing = await human_invite(h)
    ringing.deliver(180, to_tag="q1")
    started = asyncio.get_running_loop().time()
    await h.engine.wait(lambda: h.engine.cancelled)
    assert asyncio.get_running_loop().time() - started == pytest.approx(30.0)
    ringing.deliver(487, to_tag="q1")
    _, final = await notifies(h, 2)
    assert sipfrag_of(final)[0] == 408
    await until(lambda: h.state() is CallState.CONNECTED)
    assert h.call.bridge.b is h.call.agent_leg
    h.send_pbx(h.pbx_request("BYE", 9))
    await answer_bye(h.engine)
    await h.finished()


async def test_caller_hanging_up_mid_transfer_ends_every_leg() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    ringing = await human_invite(h)
    ringing.deliver(180, to_tag="q1")
    h.send_pbx(h.pbx_request("BYE", 9))
    await h.engine.wait(lambda: h.engine.cancelled and h.engine.requests("BYE"))
    assert h.engine.cancelled == [ringing]
    ringing.deliver(487, to_tag="q1")
    await answer_bye(h.engine)  # Retell's leg
    await h.finished()
    assert h.state() is CallState.ENDED
    assert h.call.end_reason == "pbx_bye"
    assert h.call.transfers[0].outcome == "aborted"


async def test_agent_hanging_up_mid_transfer_still_reaches_the_human() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    ringing = await human_invite(h)
    ringing.deliver(180, to_tag="q1")
    bye = h.send_retell("BYE", 3, invite)
    await h.engine.wait(lambda: bye.final_sent)
    assert h.state() is CallState.TRANSFERRING
    ringing.deliver(200, to_tag="q1", body=HUMAN_SDP, contact="<sip:800@10.0.0.1:5060>")
    await h.engine.wait(lambda: len(h.engine.requests("INVITE")) == 3)
    h.engine.requests("INVITE")[2].deliver(200, to_tag="pbxtag", contact="<sip:3cx@10.0.0.1>")
    await until(lambda: h.call.bridge.b.role is Role.HUMAN)
    assert len(h.engine.requests("NOTIFY")) == 1  # the agent is gone: no final NOTIFY to it
    h.send_pbx(h.pbx_request("BYE", 9))
    await answer_bye(h.engine)
    await h.finished()
    assert [b.request.call_id for b in h.engine.requests("BYE")] == [
        h.call.legs[Role.HUMAN].call_id
    ]


async def test_agent_gone_and_transfer_failed_ends_the_call() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    ringing = await human_invite(h)
    bye = h.send_retell("BYE", 3, invite)
    await h.engine.wait(lambda: bye.final_sent)
    ringing.deliver(486, to_tag="q1")
    await answer_bye(h.engine)  # the caller: nobody is left for it
    await h.finished()
    assert h.call.end_reason == "retell_bye"


async def test_second_refer_while_transferring_is_491() -> None:
    h = harness("invite")
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    await human_invite(h)
    again = h.send_retell("REFER", 4, invite, ("Refer-To", "801"))
    await h.engine.wait(lambda: again.final_sent)
    assert h.engine.to_pbx[-1].status == 491


def test_transfer_config_default_ring_timeout() -> None:
    assert TransferConfig().ring_timeout == 30.0
