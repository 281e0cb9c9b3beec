"""Requests that reach a call while it hangs up its legs (found by the soak, bench/soak.py).

The call's flow reads no fact while it waits for the answers to its own BYEs; a request queued
then was never answered, and its server transaction (a non-INVITE one in Trying has no timer,
RFC 3261 §17.2.2) stayed in the engine forever: one leaked transaction per BYE that crossed
sbc's. Now such a request is answered at once: a BYE 200 (both ends said goodbye), anything
else 481.
"""

from __future__ import annotations

import asyncio

from sbc.b2bua.call import CallState
from tests.unit.call_harness import Harness, answer_bye


def bye_answers(h: Harness) -> list[int]:
    return [r.status for r in h.engine.to_pbx if r.cseq.method == "BYE"]


async def test_the_pbx_bye_crossing_sbc_bye_is_answered_before_sbc_bye_is() -> None:
    h = Harness()
    invite = await h.connect()
    h.send_retell("BYE", 1, invite)  # Retell hangs up: sbc BYEs the PBX leg
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    assert h.state() is CallState.ENDING
    crossing = h.send_pbx(h.pbx_request("BYE", 2))  # 3CX hung up at the same moment
    assert crossing.final_sent  # answered now, not after sbc's BYE is
    assert bye_answers(h) == [200, 200]  # Retell's BYE, then 3CX's
    await answer_bye(h.engine)
    await h.finished()
    assert h.call.end_reason == "retell_bye"


async def test_other_requests_while_hanging_up_are_481() -> None:
    h = Harness()
    invite = await h.connect()
    h.send_retell("BYE", 1, invite)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    options = h.send_pbx(h.pbx_request("OPTIONS", 3))
    assert options.final_sent
    assert [r.status for r in h.engine.to_pbx if r.cseq.method == "OPTIONS"] == [481]
    await answer_bye(h.engine)
    await h.finished()


async def test_a_request_queued_before_the_hang_up_is_answered_too() -> None:
    h = Harness()
    invite = await h.connect()
    # Both arrive before the call's task runs again: the BYE from Retell makes the call hang
    # up; 3CX's BYE, queued behind it, is answered as the hang-up starts.
    h.send_retell("BYE", 1, invite)
    crossing = h.send_pbx(h.pbx_request("BYE", 2))
    assert not crossing.final_sent
    await h.engine.wait(lambda: h.engine.requests("BYE") or crossing.final_sent)
    await asyncio.sleep(0)
    assert crossing.final_sent
    assert bye_answers(h) == [200, 200]
    if h.engine.requests("BYE"):
        await answer_bye(h.engine)
    await h.finished()
