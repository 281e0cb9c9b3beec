"""Re-INVITE glare (RFC 3261 §14.1, §14.2; RFC 3311 §5.2) on the PBX's leg, on a fake clock
(``looptime``): a re-INVITE or an UPDATE offer from the PBX crossing sbc's own session refresh
is answered 491, and sbc's refresh answered 491 goes once more after the §14.1 wait (0 to 2 s
on the caller's leg, whose Call-ID the PBX chose; 2.1 to 4 s on a leg sbc made)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from sbc.b2bua.leg import glare_wait
from sbc.sip.message import Request
from tests.unit.call_harness import PBX_SDP, FakeHandle, Harness, a_invite

pytestmark = pytest.mark.looptime


def invite_without_update() -> Request:
    # Without UPDATE in the PBX's Allow, sbc refreshes the session by re-INVITE (RFC 4028 §7.4).
    invite = a_invite(("Session-Expires", "1800;refresher=uas"), ("Supported", "timer"))
    headers = invite.headers.set("Allow", "INVITE, ACK, BYE, CANCEL, INFO")
    return dataclasses.replace(invite, headers=headers)


def harness() -> Harness:
    return Harness(
        invite=invite_without_update(),
        t1=0.5,
        t2=4.0,
        max_duration=7200.0,
        answer_timeout=90.0,
        limit=86_400.0,
    )


def now() -> float:
    return asyncio.get_running_loop().time()


def reinvites(h: Harness) -> list[FakeHandle]:
    b_call_id = h.engine.requests("INVITE")[0].request.call_id
    return [x for x in h.engine.requests("INVITE") if x.request.call_id != b_call_id]


async def test_crossing_reinvites_are_491_both_ways_and_sbc_retries_in_the_window() -> None:
    h = harness()
    await h.connect()
    await h.engine.wait(lambda: reinvites(h))
    (refresh,) = reinvites(h)
    assert now() == pytest.approx(900.0)  # RFC 4028 §10: half the interval
    # The PBX's re-INVITE crosses sbc's (still unanswered): 491.
    crossing = h.send_pbx(h.pbx_request("INVITE", 2, body=PBX_SDP))
    await h.engine.wait(lambda: crossing.final_sent)
    assert h.engine.to_pbx[-1].status == 491
    # The PBX answers sbc's 491 too; sbc sends it again after 0..2 s, with a new CSeq.
    refresh.deliver(491, to_tag=h.call.caller_leg.local_tag)
    await h.engine.wait(lambda: len(reinvites(h)) == 2)
    again = reinvites(h)[1]
    waited = now() - 900.0
    assert 0.0 <= waited <= 2.0
    assert again.request.cseq.seq == refresh.request.cseq.seq + 1
    assert again.request.body == refresh.request.body
    acked = len(h.engine.acks)  # Retell's 200 was ACKed already
    again.deliver(200, body=PBX_SDP, to_tag=h.call.caller_leg.local_tag)
    await h.engine.wait(lambda: len(h.engine.acks) > acked)
    assert h.engine.acks[-1].cseq.seq == again.request.cseq.seq
    assert h.engine.acks[-1].call_id == again.request.call_id
    # Once the refresh is done, a re-INVITE from the PBX is answered here again.
    later = h.send_pbx(h.pbx_request("INVITE", 3, body=PBX_SDP))
    await h.engine.wait(lambda: later.final_sent)
    assert h.engine.to_pbx[-1].status == 200


async def test_an_update_offer_crossing_sbcs_reinvite_is_491() -> None:
    h = harness()
    await h.connect()
    await h.engine.wait(lambda: reinvites(h))
    update = h.send_pbx(h.pbx_request("UPDATE", 2, body=PBX_SDP))
    await h.engine.wait(lambda: update.final_sent)
    assert h.engine.to_pbx[-1].status == 491
    # An UPDATE without SDP (a refresh) is no offer: answered 200 even then.
    refresh = h.send_pbx(h.pbx_request("UPDATE", 3))
    await h.engine.wait(lambda: refresh.final_sent)
    assert h.engine.to_pbx[-1].status == 200


async def test_a_second_491_is_not_retried() -> None:
    h = harness()
    await h.connect()
    await h.engine.wait(lambda: reinvites(h))
    reinvites(h)[0].deliver(491, to_tag=h.call.caller_leg.local_tag)
    await h.engine.wait(lambda: len(reinvites(h)) == 2)
    assert now() - 900.0 <= 2.0
    reinvites(h)[1].deliver(491, to_tag=h.call.caller_leg.local_tag)
    await asyncio.sleep(10.0)
    assert len(reinvites(h)) == 2
    assert h.call.caller_leg.up  # a refused refresh is not a lost dialog


def test_the_wait_depends_on_who_chose_the_call_id() -> None:
    rng = random.Random(1)

    class FakeLeg:
        def __init__(self, incoming: object) -> None:
            self.incoming = incoming

    uas = [glare_wait(FakeLeg(object()), rng) for _ in range(2000)]  # type: ignore[arg-type]
    uac = [glare_wait(FakeLeg(None), rng) for _ in range(2000)]  # type: ignore[arg-type]
    assert 0.0 <= min(uas) < 0.1 and 1.9 < max(uas) <= 2.0
    assert 2.1 <= min(uac) < 2.2 and 3.9 < max(uac) <= 4.0
    assert all(abs(round(w * 100) - w * 100) < 1e-9 for w in uas + uac)  # 10 ms units
