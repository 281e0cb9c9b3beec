"""Transfers by REFER meeting a peer's fault, on a fake clock (looptime); the same faults of a
transfer by INVITE and the NOTIFY that never comes are in test_transfer.py. Retell hanging up
while 3CX is transferring does not stop the transfer (the caller still reaches the target, or
is hung up when it failed: nobody is left for it); the caller hanging up ends every leg."""

from __future__ import annotations

import pytest

from sbc.b2bua.call import CallState
from sbc.sip.message import Request
from tests.unit.call_harness import FakeHandle, Harness, answer_bye
from tests.unit.test_transfer import connected, harness, notifies, refer, sipfrag_of, until

pytestmark = pytest.mark.looptime


def pbx_notify(h: Harness, seq: int, status_line: bytes, state: str) -> Request:
    return h.pbx_request(
        "NOTIFY",
        seq,
        ("Event", "refer"),
        ("Subscription-State", state),
        ("Content-Type", "message/sipfrag"),
        body=status_line,
    )


async def referred(h: Harness) -> FakeHandle:
    """Connected, Retell's REFER accepted, sbc's REFER to 3CX answered 202."""
    invite = await connected(h)
    refer(h, invite, "800")
    await notifies(h, 1)
    await h.engine.wait(lambda: h.engine.requests("REFER"))
    h.engine.requests("REFER")[0].deliver(202, to_tag="pbxtag")
    await until(lambda: h.state() is CallState.TRANSFERRING)
    return invite


async def test_retell_hanging_up_mid_transfer_still_hands_the_caller_over() -> None:
    h = harness("refer")
    invite = await referred(h)
    bye = h.send_retell("BYE", 3, invite)
    await h.engine.wait(lambda: bye.final_sent)
    assert h.state() is CallState.TRANSFERRING  # 3CX is still moving the caller
    done = h.send_pbx(pbx_notify(h, 5, b"SIP/2.0 200 OK\r\n", "terminated;reason=noresource"))
    await h.engine.wait(lambda: done.final_sent)
    pbx_bye = await answer_bye(h.engine, 0)  # RFC 5589: sbc leaves the PBX dialog
    assert pbx_bye.request.call_id == "pbx-call@10.0.0.1"
    await h.finished()
    assert len(h.engine.requests("NOTIFY")) == 1  # Retell is gone: no final NOTIFY to it
    assert [b.request.call_id for b in h.engine.requests("BYE")] == ["pbx-call@10.0.0.1"]
    (record,) = h.call.transfers
    assert (record.outcome, record.status) == ("transferred", 200)


async def test_retell_gone_and_the_transfer_failed_hangs_up_the_caller() -> None:
    h = harness("refer")
    invite = await referred(h)
    bye = h.send_retell("BYE", 3, invite)
    await h.engine.wait(lambda: bye.final_sent)
    busy = h.send_pbx(pbx_notify(h, 5, b"SIP/2.0 486 Busy Here\r\n", "terminated"))
    await h.engine.wait(lambda: busy.final_sent)
    pbx_bye = await answer_bye(h.engine, 0)  # nobody is left for the caller
    assert pbx_bye.request.call_id == "pbx-call@10.0.0.1"
    await h.finished()
    assert h.call.end_reason == "retell_bye"
    assert h.call.transfers[0].outcome == "failed"
    assert len(h.engine.requests("NOTIFY")) == 1


async def test_the_caller_hanging_up_mid_transfer_ends_every_leg() -> None:
    h = harness("refer")
    await referred(h)
    bye = h.send_pbx(h.pbx_request("BYE", 5))
    await h.engine.wait(lambda: bye.final_sent)
    assert h.engine.to_pbx[-1].status == 200
    retell_bye = await answer_bye(h.engine, 0)
    assert retell_bye.request.call_id == h.call.agent_leg.call_id
    await h.finished()
    assert h.state() is CallState.ENDED
    assert h.call.end_reason == "pbx_bye"
    assert h.call.transfers[0].outcome == "aborted"
    # Retell never hears that the transfer succeeded.
    assert all(sipfrag_of(n)[0] != 200 for n in h.engine.requests("NOTIFY"))
