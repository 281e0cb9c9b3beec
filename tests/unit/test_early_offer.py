"""Leg b's INVITE leaves in the dispatch of the call's own INVITE (pass-through media).

The post-dial delay is the time from the PBX's INVITE to Retell's. With a media backend that
never waits (``MediaBackend.immediate``), ``Call.start`` offers the call on leg b before the
call's task first runs and before the PBX gets its 100: a burst of INVITEs no longer makes each
far INVITE wait for every other INVITE of the loop's pass (docs/performance.md, "Round 5:
post-dial tail"). A backend that waits (relay, rtpengine) keeps the offer in the task.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from sbc.b2bua.call import Call, CallState
from sbc.b2bua.calls import CallManager
from sbc.media.base import MediaSession, PassthroughBackend
from sbc.net.engine import IncomingRequest
from tests.unit.call_harness import (
    PBX_SOURCE,
    RETELL_SDP,
    FakeEngine,
    a_invite,
    config,
)


class WaitingBackend(PassthroughBackend):
    """Pass-through SDP, but allocate() waits a loop pass, as a relay or rtpengine would."""

    immediate = False

    async def allocate(self, call_id: str) -> MediaSession:
        await asyncio.sleep(0)
        return await super().allocate(call_id)


class LyingBackend(PassthroughBackend):
    """Claims to be immediate and waits all the same (a bug): the call fails, nothing hangs."""

    async def allocate(self, call_id: str) -> MediaSession:
        await asyncio.sleep(0)
        return await super().allocate(call_id)


def new_call(engine: FakeEngine, backend: PassthroughBackend, *extra: tuple[str, str]) -> Call:
    incoming = IncomingRequest(engine, "pbx-invite", a_invite(*extra), PBX_SOURCE, None)
    n = iter(range(1, 1000))
    return Call(
        incoming,
        config=config(),
        engine=engine,  # type: ignore[arg-type]
        media=backend,
        call_uuid="uuid-early",
        wall_clock=lambda: 1_795_000_000.0,
        random_bytes=lambda size: next(n).to_bytes(size, "big"),
    )


async def test_start_sends_leg_b_invite_at_once_and_run_goes_on_from_there() -> None:
    engine = FakeEngine()
    call = new_call(engine, PassthroughBackend())
    call.start()
    # No await since: the INVITE is out, in the dispatch that made the call.
    (invite,) = engine.requests("INVITE")
    assert call.state is CallState.CALLING
    assert b"m=audio" in invite.request.body
    task = asyncio.ensure_future(call.run())
    invite.deliver(200, body=RETELL_SDP)
    await engine.wait(lambda: 200 in [r.status for r in engine.to_pbx])
    assert len(engine.requests("INVITE")) == 1  # not offered a second time by the flow
    call.shutdown()
    await asyncio.wait_for(task, 5.0)


async def test_a_backend_that_waits_keeps_the_offer_in_the_task() -> None:
    engine = FakeEngine()
    call = new_call(engine, WaitingBackend())
    call.start()
    assert engine.requests("INVITE") == []
    assert call.state is CallState.INCOMING
    task = asyncio.ensure_future(call.run())
    await engine.wait(lambda: engine.requests("INVITE"))
    call.shutdown()
    await asyncio.wait_for(task, 5.0)


async def test_a_call_refused_at_once_is_answered_by_start_and_run_ends() -> None:
    engine = FakeEngine()
    # Session-Expires below the Min-SE: 422 (RFC 4028 §8.1), before any media or INVITE.
    call = new_call(engine, PassthroughBackend(), ("Session-Expires", "10"))
    call.start()
    assert [r.status for r in engine.to_pbx] == [422]
    await asyncio.wait_for(call.run(), 5.0)
    assert engine.requests("INVITE") == []
    assert call.end_reason == "refused:422"


async def test_a_backend_that_claims_immediate_but_waits_fails_the_call() -> None:
    engine = FakeEngine()
    call = new_call(engine, LyingBackend())
    call.start()
    assert engine.requests("INVITE") == []
    await asyncio.wait_for(call.run(), 5.0)
    assert engine.requests("INVITE") == []
    assert [r.status for r in engine.to_pbx][-1] >= 500  # the PBX is not left waiting


@pytest.mark.parametrize("backend", [PassthroughBackend(), WaitingBackend()])
async def test_manager_sends_far_invite_before_the_100(backend: PassthroughBackend) -> None:
    """Pass-through: Retell's INVITE, then the PBX's 100, in the INVITE's own dispatch."""
    engine = FakeEngine()
    trusted = {"trusted": (ipaddress.ip_network("10.0.0.0/24"),)}
    calls = CallManager(engine, config(**trusted), backend)  # type: ignore[arg-type]
    calls.handle_request(IncomingRequest(engine, "k1", a_invite(), PBX_SOURCE, None))
    sent = [what for _, what in engine.timeline]
    if backend.immediate:
        assert sent == ["INVITE", "to-pbx 100"]
    else:
        assert sent == ["to-pbx 100"]  # the INVITE follows from the call's task
    await engine.wait(lambda: engine.requests("INVITE"))
    await calls.stop()
    assert calls.active == 0
