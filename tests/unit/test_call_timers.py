"""The call's timers at their real values, on a fake clock (``looptime``): no test waits.

Every figure is the one an operator configures or the RFC sets (answer_timeout 90 s, ring
repeat 60 s, T1 0.5 s / T2 4 s, max_duration 2 h, RFC 4028 refreshes), and every assertion
is on the loop time at which a message went out.
"""

from __future__ import annotations

import asyncio

import pytest

from sbc.b2bua.call import CallState
from sbc.media.base import MediaSession, PassthroughBackend, PassthroughSession, Side
from tests.unit.call_harness import RETELL_SDP, Harness, a_invite, answer_bye

pytestmark = pytest.mark.looptime

REAL = {"t1": 0.5, "t2": 4.0, "max_duration": 7200.0, "answer_timeout": 90.0}


def harness(**overrides: object) -> Harness:
    """A call with the real timer values, any wait bounded by a day of loop time."""
    return Harness(**{**REAL, "limit": 86_400.0, **overrides})


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_ringing_is_repeated_each_minute_until_answer_timeout_then_cancelled() -> None:
    h = harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.engine.wait(lambda: h.engine.times("CANCEL"))
    # RFC 3261 §13.3.1.1: a provisional at least every minute while the agent rings.
    assert h.engine.times("to-pbx 180") == pytest.approx([0.0, 60.0])
    assert h.engine.times("to-pbx 480") == pytest.approx([90.0])
    assert h.engine.times("CANCEL") == pytest.approx([90.0])
    invite.deliver(487)
    await h.finished()
    assert h.call.end_reason == "answer_timeout"
    assert (h.call.pbx_status, h.call.retell_status) == (480, 487)


async def test_cancel_never_answered_ends_the_call_after_64_t1() -> None:
    h = harness()
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    h.call.cancelled(h.call.caller_leg)
    await h.finished()
    assert h.engine.times("to-pbx 487") == pytest.approx([0.0])
    assert h.engine.times("CANCEL") == pytest.approx([0.0])
    assert now() == pytest.approx(32.0)  # RFC 3261 §17.1.1.2: Timer B, 64*T1
    assert h.state() is CallState.ENDED


async def test_200_is_repeated_until_the_ack_and_the_call_ends_without_one() -> None:
    h = harness()
    invite = await h.b_invite()
    invite.deliver(200, body=RETELL_SDP)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    # RFC 3261 §13.3.1.4: T1, doubling up to T2, for 64*T1; then BYE to both legs.
    sent = h.engine.times("to-pbx 200")
    assert sent == pytest.approx([0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
    assert h.engine.times("BYE") == pytest.approx([32.0, 32.0])
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "pbx_no_ack"


async def test_max_duration_hangs_up_both_legs() -> None:
    h = harness()
    await h.connect()
    await h.engine.wait(lambda: len(h.engine.requests("BYE")) == 2)
    assert h.engine.times("BYE") == pytest.approx([7200.0, 7200.0])
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "max_duration"


async def test_sbc_refreshes_the_pbx_session_at_half_the_interval() -> None:
    invite = a_invite(("Session-Expires", "1800;refresher=uas"), ("Supported", "timer"))
    h = harness(invite=invite, max_duration=2000.0)
    await h.connect()
    await h.engine.wait(lambda: h.engine.requests("UPDATE"))
    (update,) = h.engine.requests("UPDATE")
    assert h.engine.times("UPDATE") == pytest.approx([900.0])  # RFC 4028 §10
    assert update.request.headers.get("Session-Expires") == "1800;refresher=uac"
    update.deliver(200, to_tag=h.call.caller_leg.local_tag)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    assert h.engine.times("UPDATE") == pytest.approx([900.0, 1800.0])
    assert h.engine.times("BYE")[0] == pytest.approx(2000.0)  # max_duration, not expiry


async def test_pbx_that_never_refreshes_is_hung_up_before_expiry() -> None:
    invite = a_invite(("Session-Expires", "1800;refresher=uac"), ("Supported", "timer"))
    h = harness(invite=invite)
    await h.connect()
    await h.engine.wait(lambda: len(h.engine.requests("BYE")) == 2)
    # RFC 4028 §10: BYE at expiry minus min(32 s, interval / 3).
    assert h.engine.times("BYE") == pytest.approx([1768.0, 1768.0])
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "session_expired"


async def test_refresh_from_the_pbx_moves_the_expiry() -> None:
    invite = a_invite(("Session-Expires", "1800;refresher=uac"), ("Supported", "timer"))
    h = harness(invite=invite)
    await h.connect()
    await asyncio.sleep(1000.0)
    update = h.send_pbx(
        h.pbx_request(
            "UPDATE", 2, ("Session-Expires", "1800;refresher=uac"), ("Supported", "timer")
        )
    )
    await h.engine.wait(lambda: update.final_sent)
    await h.engine.wait(lambda: len(h.engine.requests("BYE")) == 2)
    assert h.engine.times("BYE") == pytest.approx([2768.0, 2768.0])


class SilentSession(PassthroughSession):
    """Media that saw its last packet at loop time 0."""

    def last_activity(self, side: Side) -> float | None:
        return 0.0


class SilentBackend(PassthroughBackend):
    async def allocate(self, call_id: str) -> MediaSession:
        return SilentSession(call_id)


async def test_media_timeout_counts_from_the_last_packet() -> None:
    h = harness(media=SilentBackend(), media_timeout=60.0)
    await h.connect()
    await h.engine.wait(lambda: len(h.engine.requests("BYE")) == 2)
    assert h.engine.times("BYE") == pytest.approx([60.0, 60.0])
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()
    assert h.call.end_reason == "media_timeout"
